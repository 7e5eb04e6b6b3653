//! Attribute-based access control (ABAC) for NOPS policy plugins.
//!
//! A *rule document* (JSON, format described in `policies/README.md`) is parsed once into a
//! compiled [`Policy`], which then decides any number of [`Request`]s:
//!
//! ```
//! use abac_engine::{Attribute, NO_ATTRIBUTES, Policy, Request, Value};
//!
//! let policy = Policy::from_json(br#"{ "version": 1, "rules": [
//!     { "id": "operators-read", "effect": "permit", "actions": ["agents:read"],
//!       "when": [ { "attr": "principal.role", "op": "eq", "value": "operator" } ] } ] }"#)?;
//!
//! let principal = [Attribute::new("role", Value::Text("operator".into()))];
//! let request = Request { principal: &principal[..], action: "agents:read", resource: NO_ATTRIBUTES, context: NO_ATTRIBUTES };
//! let decision = policy.evaluate(&request);
//! assert!(decision.allow);
//! assert_eq!(decision.reasons, ["operators-read"]);
//! # Ok::<(), abac_engine::ParseError>(())
//! ```
//!
//! # Semantics
//!
//! Evaluation follows Cedar: **default deny, forbid overrides permit**. A request is allowed
//! if and only if at least one `permit` rule matches and no `forbid` rule matches. A rule
//! matches when one of its action patterns matches the request's action and every one of its
//! conditions holds (an empty `when` always holds). The decision's reasons are the ids of the
//! deciding rules, in document order: every matching `forbid` rule on a deny, every matching
//! `permit` rule on an allow, or [`DEFAULT_DENY_REASON`] when nothing matched. On an allow, the
//! obligations of every matching `permit` rule are returned, in document order, without
//! duplicates; the caller must apply all of them.
//!
//! # Missing attributes
//!
//! A condition that reads an attribute the request does not carry is **false**, never an
//! error, and so is a condition whose `ref` names a missing attribute. This holds for `ne` too.
//! The consequence for `forbid` rules matters: a forbid whose condition reads a missing
//! attribute does **not** match. `principal.tenant ne resource.tenant` does not forbid a
//! request without `resource.tenant`. To forbid requests that lack an attribute, write a
//! forbid rule with the [`absent`](Operator::Absent) operator, the one operator that is true
//! on a missing attribute.
//!
//! # Performance
//!
//! Parsing resolves every attribute path into a (scope, name) slot, sorts `in` lists for
//! binary search and splits the rules into forbids and permits. Evaluation looks each slot up
//! at most once per request (a fixed-size cache on the stack holds the 64 most-read paths;
//! rarer ones are looked up each time they are read) and allocates nothing except
//! the two vectors of the returned [`Decision`]; [`Policy::is_allowed`] allocates nothing at
//! all. A compiled policy is immutable, `Send` and `Sync`: keep it for as long as the document
//! does not change.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;

/// The document format version this engine reads (the document's `version` field).
pub const FORMAT_VERSION: u64 = 1;
/// Largest document accepted, in bytes.
pub const DOCUMENT_BYTES_MAX: usize = 1 << 20;
/// Most rules in one document.
pub const RULES_MAX: usize = 1024;
/// Most conditions (`when` entries) in one rule.
pub const CONDITIONS_PER_RULE_MAX: usize = 32;
/// Most action patterns in one rule.
pub const ACTIONS_PER_RULE_MAX: usize = 64;
/// Most obligations in one rule.
pub const OBLIGATIONS_PER_RULE_MAX: usize = 16;
/// Most items in a list literal (`in`, or `eq`/`ne` against a list).
pub const LIST_ITEMS_MAX: usize = 256;
/// Longest rule id, in bytes.
pub const ID_BYTES_MAX: usize = 128;
/// Longest text in a document (action pattern, attribute path, text literal, obligation key
/// or value), in bytes.
pub const TEXT_BYTES_MAX: usize = 1024;
/// The reason given when no rule matched. It contains spaces, so it can never be a rule id.
pub const DEFAULT_DENY_REASON: &str = "no permit rule matched";

/// Attribute slots cached per evaluation; slots beyond this (rare: only documents that read
/// more than this many distinct attributes) are looked up each time they are read.
const SLOT_CACHE: usize = 64;

// ------------------------------------------------------------------------------------------
// Values and requests
// ------------------------------------------------------------------------------------------

/// An owned attribute value, mirroring the WIT `value` variant.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string.
    Text(String),
    /// A signed 64-bit integer.
    Integer(i64),
    /// A 64-bit float.
    Number(f64),
    /// A boolean.
    Boolean(bool),
    /// A list of strings.
    Texts(Vec<String>),
}

impl Value {
    /// A borrowed view of this value.
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Self::Text(s) => ValueRef::Text(s),
            Self::Integer(i) => ValueRef::Integer(*i),
            Self::Number(n) => ValueRef::Number(*n),
            Self::Boolean(b) => ValueRef::Boolean(*b),
            Self::Texts(l) => ValueRef::Texts(l),
        }
    }
}

/// A borrowed attribute value: what [`Attributes::lookup`] returns, so that requests can be
/// evaluated in place without copying their strings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    /// A string.
    Text(&'a str),
    /// A signed 64-bit integer.
    Integer(i64),
    /// A 64-bit float.
    Number(f64),
    /// A boolean.
    Boolean(bool),
    /// A list of strings.
    Texts(&'a [String]),
}

/// A named attribute with an owned value.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    /// The name, without the scope: `role`, not `principal.role`.
    pub name: String,
    /// The value.
    pub value: Value,
}

impl Attribute {
    /// An attribute named `name` with `value`.
    pub fn new(name: impl Into<String>, value: Value) -> Self {
        Self { name: name.into(), value }
    }
}

/// An empty attribute set, for a scope a request does not use.
pub const NO_ATTRIBUTES: &[Attribute] = &[];

/// A set of attributes of one scope (the principal's, the resource's or the context's).
///
/// Implemented for slices of [`Attribute`] and of `(&str, ValueRef)` pairs. A plugin that
/// receives attributes in its own types implements it on a small wrapper, so that requests
/// are evaluated without conversion.
pub trait Attributes {
    /// The value of the attribute named `name` (without scope), if present. When a name
    /// occurs more than once, the built-in implementations return the first.
    fn lookup(&self, name: &str) -> Option<ValueRef<'_>>;
}

impl Attributes for [Attribute] {
    fn lookup(&self, name: &str) -> Option<ValueRef<'_>> {
        self.iter().find(|a| a.name == name).map(|a| a.value.as_ref())
    }
}

impl Attributes for Vec<Attribute> {
    fn lookup(&self, name: &str) -> Option<ValueRef<'_>> {
        self.as_slice().lookup(name)
    }
}

impl<'v> Attributes for [(&str, ValueRef<'v>)] {
    fn lookup(&self, name: &str) -> Option<ValueRef<'_>> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

/// One access request: who (`principal`) wants to do what (`action`) to which `resource`,
/// in which `context`. All three attribute sets have the same type `A`.
#[derive(Debug)]
pub struct Request<'r, A: ?Sized> {
    /// The caller's attributes, read by `principal.<name>` paths.
    pub principal: &'r A,
    /// The action, e.g. `agents:read`.
    pub action: &'r str,
    /// The target's attributes, read by `resource.<name>` paths.
    pub resource: &'r A,
    /// Attributes of the situation (time, source address...), read by `context.<name>`.
    pub context: &'r A,
}

impl<A: ?Sized> Clone for Request<'_, A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A: ?Sized> Copy for Request<'_, A> {}

/// The outcome of [`Policy::evaluate`]. Strings borrow from the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision<'p> {
    /// True if the request is allowed.
    pub allow: bool,
    /// The ids of the deciding rules, in document order, or [`DEFAULT_DENY_REASON`].
    pub reasons: Vec<&'p str>,
    /// On an allow: the `[key, value]` obligations of every matching permit rule, in
    /// document order, without duplicates. Always empty on a deny.
    pub obligations: Vec<(&'p str, &'p str)>,
}

// ------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------

/// Why a document was rejected. The message names the offending rule and condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    message: String,
}

impl ParseError {
    fn new(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }

    /// The message, also what `Display` prints.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParseError {}

// ------------------------------------------------------------------------------------------
// The document as written
// ------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument {
    version: u64,
    #[serde(default)]
    #[allow(dead_code)] // Documentation for people; not evaluated.
    description: Option<String>,
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: String,
    #[serde(default)]
    #[allow(dead_code)] // Documentation for people; not evaluated.
    description: Option<String>,
    effect: Effect,
    actions: Vec<String>,
    #[serde(default)]
    when: Vec<RawCondition>,
    #[serde(default)]
    obligations: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    attr: String,
    op: Operator,
    #[serde(default)]
    value: Option<serde_json::Value>,
    #[serde(default, rename = "ref")]
    reference: Option<String>,
}

/// A rule's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Allows the request if no forbid rule matches.
    Permit,
    /// Denies the request, whatever the permit rules say.
    Forbid,
}

/// A condition's operator (the `op` field). "Numeric" means integer or number; integers and
/// numbers compare by mathematical value (`1` equals `1.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operator {
    /// Equal: same text, same boolean, same list (order included), or same numeric value.
    Eq,
    /// Not equal: both values present and `eq` false (a value of another type is different).
    Ne,
    /// The attribute (text) is one of the operand's texts.
    In,
    /// The attribute (list of texts) contains the operand (text).
    Contains,
    /// Numeric less than.
    Lt,
    /// Numeric less than or equal.
    Le,
    /// Numeric greater than.
    Gt,
    /// Numeric greater than or equal.
    Ge,
    /// The attribute (text) starts with the operand (text).
    Prefix,
    /// The attribute is present, whatever its value. Takes no operand.
    Exists,
    /// The attribute is missing. Takes no operand. The only operator true on a missing
    /// attribute: use it to forbid requests that lack one.
    Absent,
}

impl Operator {
    fn name(self) -> &'static str {
        match self {
            Self::Eq => "eq",
            Self::Ne => "ne",
            Self::In => "in",
            Self::Contains => "contains",
            Self::Lt => "lt",
            Self::Le => "le",
            Self::Gt => "gt",
            Self::Ge => "ge",
            Self::Prefix => "prefix",
            Self::Exists => "exists",
            Self::Absent => "absent",
        }
    }
}

// ------------------------------------------------------------------------------------------
// The compiled form
// ------------------------------------------------------------------------------------------

/// The scope of an attribute path: the part before the first dot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Principal,
    Resource,
    Context,
}

/// An attribute path resolved once, at parse time.
#[derive(Debug)]
struct Path {
    scope: Scope,
    name: Box<str>,
}

/// Index into [`Policy::paths`].
type Slot = u32;

#[derive(Debug)]
enum ActionPattern {
    /// `*`: every action.
    Any,
    /// An action spelled out.
    Exact(Box<str>),
    /// `prefix:*`, stored as `prefix:`: every action starting with it.
    Prefix(Box<str>),
}

impl ActionPattern {
    fn matches(&self, action: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(a) => **a == *action,
            Self::Prefix(p) => action.starts_with(&**p),
        }
    }
}

#[derive(Debug)]
enum Operand {
    /// `exists` and `absent`.
    None,
    /// A literal `value`.
    Literal(Value),
    /// The literal list of `in`, sorted and deduplicated for binary search.
    SortedTexts(Box<[String]>),
    /// Another attribute, named by `ref`.
    Attribute(Slot),
}

#[derive(Debug)]
struct Condition {
    slot: Slot,
    op: Operator,
    operand: Operand,
}

#[derive(Debug)]
struct Rule {
    id: Box<str>,
    actions: Box<[ActionPattern]>,
    conditions: Box<[Condition]>,
    obligations: Box<[(Box<str>, Box<str>)]>,
}

/// A compiled rule document, ready to evaluate requests. Build it with
/// [`Policy::from_json`], keep it, and call [`Policy::evaluate`] for each request.
#[derive(Debug)]
pub struct Policy {
    forbids: Box<[Rule]>,
    permits: Box<[Rule]>,
    /// Every distinct attribute path the rules read, most-read first.
    paths: Box<[Path]>,
}

impl Policy {
    /// Parses and compiles a JSON rule document.
    ///
    /// Rejects, with a message naming the rule and condition at fault: documents over
    /// [`DOCUMENT_BYTES_MAX`], invalid JSON, unknown fields or operators, a `version` other
    /// than [`FORMAT_VERSION`], more than [`RULES_MAX`] rules, duplicate or malformed rule ids,
    /// malformed action patterns or attribute paths, operands of the wrong type or missing,
    /// obligations on forbid rules, and anything over the other limits of this module.
    pub fn from_json(document: &[u8]) -> Result<Self, ParseError> {
        if document.len() > DOCUMENT_BYTES_MAX {
            return Err(ParseError::new(format!(
                "the document is {} bytes; at most {DOCUMENT_BYTES_MAX} are accepted",
                document.len()
            )));
        }
        if document.iter().all(u8::is_ascii_whitespace) {
            return Err(ParseError::new("the document is empty"));
        }
        let raw: RawDocument =
            serde_json::from_slice(document).map_err(|e| ParseError::new(format!("invalid rule document: {e}")))?;
        Compiler::default().compile(raw)
    }

    /// Number of rules, forbids and permits together.
    pub fn rule_count(&self) -> usize {
        self.forbids.len() + self.permits.len()
    }

    /// Decides `request`, with the reasons and obligations. See the [crate documentation]
    /// for the semantics.
    ///
    /// [crate documentation]: crate
    pub fn evaluate<'p, A: Attributes + ?Sized>(&'p self, request: &Request<'_, A>) -> Decision<'p> {
        let mut resolver = Resolver::new(&self.paths, request);
        let mut reasons = Vec::new();
        for rule in self.forbids.iter() {
            if rule.matches(request.action, &mut resolver) {
                reasons.push(&*rule.id);
            }
        }
        if !reasons.is_empty() {
            return Decision { allow: false, reasons, obligations: Vec::new() };
        }
        let mut obligations: Vec<(&'p str, &'p str)> = Vec::new();
        for rule in self.permits.iter() {
            if rule.matches(request.action, &mut resolver) {
                reasons.push(&*rule.id);
                for (key, value) in rule.obligations.iter() {
                    let pair = (&**key, &**value);
                    if !obligations.contains(&pair) {
                        obligations.push(pair);
                    }
                }
            }
        }
        if reasons.is_empty() {
            reasons.push(DEFAULT_DENY_REASON);
            return Decision { allow: false, reasons, obligations };
        }
        Decision { allow: true, reasons, obligations }
    }

    /// The same decision as [`Policy::evaluate`] without reasons or obligations. Allocates
    /// nothing and stops at the first forbid, or the first permit, that matches.
    pub fn is_allowed<A: Attributes + ?Sized>(&self, request: &Request<'_, A>) -> bool {
        let mut resolver = Resolver::new(&self.paths, request);
        !self.forbids.iter().any(|r| r.matches(request.action, &mut resolver))
            && self.permits.iter().any(|r| r.matches(request.action, &mut resolver))
    }
}

// ------------------------------------------------------------------------------------------
// Evaluation
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Cached<'r> {
    Unknown,
    Known(Option<ValueRef<'r>>),
}

/// Looks attribute slots up in a request, each at most once.
struct Resolver<'p, 'r, A: ?Sized> {
    paths: &'p [Path],
    request: &'r Request<'r, A>,
    cache: [Cached<'r>; SLOT_CACHE],
}

impl<'p, 'r, A: Attributes + ?Sized> Resolver<'p, 'r, A> {
    fn new(paths: &'p [Path], request: &'r Request<'r, A>) -> Self {
        Self { paths, request, cache: [Cached::Unknown; SLOT_CACHE] }
    }

    fn fetch(&self, slot: Slot) -> Option<ValueRef<'r>> {
        let path = &self.paths[slot as usize];
        let attributes: &'r A = match path.scope {
            Scope::Principal => self.request.principal,
            Scope::Resource => self.request.resource,
            Scope::Context => self.request.context,
        };
        attributes.lookup(&path.name)
    }

    fn get(&mut self, slot: Slot) -> Option<ValueRef<'r>> {
        match self.cache.get(slot as usize) {
            Some(Cached::Known(value)) => *value,
            Some(Cached::Unknown) => {
                let value = self.fetch(slot);
                self.cache[slot as usize] = Cached::Known(value);
                value
            }
            None => self.fetch(slot),
        }
    }
}

impl Rule {
    fn matches<A: Attributes + ?Sized>(&self, action: &str, resolver: &mut Resolver<'_, '_, A>) -> bool {
        self.actions.iter().any(|p| p.matches(action)) && self.conditions.iter().all(|c| c.holds(resolver))
    }
}

impl Condition {
    fn holds<A: Attributes + ?Sized>(&self, resolver: &mut Resolver<'_, '_, A>) -> bool {
        let subject = resolver.get(self.slot);
        let Some(subject) = subject else {
            return self.op == Operator::Absent;
        };
        let operand = match &self.operand {
            Operand::None => return self.op == Operator::Exists,
            Operand::SortedTexts(list) => {
                return matches!(subject, ValueRef::Text(s) if list.binary_search_by(|x| x.as_str().cmp(s)).is_ok());
            }
            Operand::Literal(value) => value.as_ref(),
            Operand::Attribute(slot) => match resolver.get(*slot) {
                Some(value) => value,
                None => return false,
            },
        };
        apply(self.op, subject, operand)
    }
}

/// `subject op operand`, both present.
fn apply(op: Operator, subject: ValueRef<'_>, operand: ValueRef<'_>) -> bool {
    match op {
        Operator::Eq => equal(subject, operand),
        Operator::Ne => !equal(subject, operand),
        Operator::In => match (subject, operand) {
            (ValueRef::Text(s), ValueRef::Texts(list)) => list.iter().any(|x| x == s),
            _ => false,
        },
        Operator::Contains => match (subject, operand) {
            (ValueRef::Texts(list), ValueRef::Text(s)) => list.iter().any(|x| x == s),
            _ => false,
        },
        Operator::Prefix => match (subject, operand) {
            (ValueRef::Text(s), ValueRef::Text(p)) => s.starts_with(p),
            _ => false,
        },
        Operator::Lt => numeric_order(subject, operand) == Some(Ordering::Less),
        Operator::Le => matches!(numeric_order(subject, operand), Some(Ordering::Less | Ordering::Equal)),
        Operator::Gt => numeric_order(subject, operand) == Some(Ordering::Greater),
        Operator::Ge => matches!(numeric_order(subject, operand), Some(Ordering::Greater | Ordering::Equal)),
        // Decided before the operand is read.
        Operator::Exists | Operator::Absent => false,
    }
}

fn equal(a: ValueRef<'_>, b: ValueRef<'_>) -> bool {
    match (a, b) {
        (ValueRef::Text(x), ValueRef::Text(y)) => x == y,
        (ValueRef::Boolean(x), ValueRef::Boolean(y)) => x == y,
        (ValueRef::Texts(x), ValueRef::Texts(y)) => x == y,
        _ => numeric_order(a, b) == Some(Ordering::Equal),
    }
}

/// The order of two numeric values, exact for integers beyond 2^53; `None` if either is not
/// numeric or is NaN.
fn numeric_order(a: ValueRef<'_>, b: ValueRef<'_>) -> Option<Ordering> {
    match (a, b) {
        (ValueRef::Integer(x), ValueRef::Integer(y)) => Some(x.cmp(&y)),
        (ValueRef::Number(x), ValueRef::Number(y)) => x.partial_cmp(&y),
        (ValueRef::Integer(x), ValueRef::Number(y)) => integer_vs_number(x, y),
        (ValueRef::Number(x), ValueRef::Integer(y)) => integer_vs_number(y, x).map(Ordering::reverse),
        _ => None,
    }
}

fn integer_vs_number(i: i64, f: f64) -> Option<Ordering> {
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if f.is_nan() {
        return None;
    }
    if f >= TWO_POW_63 {
        return Some(Ordering::Less);
    }
    if f < -TWO_POW_63 {
        return Some(Ordering::Greater);
    }
    // `f` is within i64 range here, so its integral part converts exactly.
    let whole = f.trunc();
    match i.cmp(&(whole as i64)) {
        Ordering::Equal => 0.0f64.partial_cmp(&(f - whole)),
        other => Some(other),
    }
}

// ------------------------------------------------------------------------------------------
// Compilation
// ------------------------------------------------------------------------------------------

#[derive(Default)]
struct Compiler {
    /// Path → slot, in order of first use.
    slots: BTreeMap<(Scope, Box<str>), Slot>,
    /// Reads per slot.
    uses: Vec<u32>,
}

impl Compiler {
    fn compile(mut self, raw: RawDocument) -> Result<Policy, ParseError> {
        if raw.version != FORMAT_VERSION {
            return Err(ParseError::new(format!(
                "unsupported version {}: this engine reads version {FORMAT_VERSION}",
                raw.version
            )));
        }
        if raw.rules.len() > RULES_MAX {
            return Err(ParseError::new(format!(
                "the document has {} rules; at most {RULES_MAX} are accepted",
                raw.rules.len()
            )));
        }
        let mut ids = BTreeSet::new();
        let mut forbids = Vec::new();
        let mut permits = Vec::new();
        for (index, raw_rule) in raw.rules.into_iter().enumerate() {
            let effect = raw_rule.effect;
            let rule = self
                .rule(raw_rule)
                .map_err(|e| ParseError::new(format!("rule {} ({}): {e}", index + 1, e.rule_label())))?;
            if !ids.insert(rule.id.clone()) {
                return Err(ParseError::new(format!("rule {} ({:?}): duplicate id", index + 1, rule.id)));
            }
            match effect {
                Effect::Forbid => forbids.push(rule),
                Effect::Permit => permits.push(rule),
            }
        }
        // Renumber the slots so that the most-read ones fall in the evaluation cache.
        let mut order: Vec<Slot> = (0..self.uses.len() as Slot).collect();
        order.sort_by(|a, b| self.uses[*b as usize].cmp(&self.uses[*a as usize]).then(a.cmp(b)));
        let mut renumber = vec![0; order.len()];
        for (new, old) in order.iter().enumerate() {
            renumber[*old as usize] = new as Slot;
        }
        let mut paths: Vec<Option<Path>> = (0..order.len()).map(|_| None).collect();
        for ((scope, name), old) in self.slots {
            paths[renumber[old as usize] as usize] = Some(Path { scope, name });
        }
        for rule in forbids.iter_mut().chain(permits.iter_mut()) {
            for condition in rule.conditions.iter_mut() {
                condition.slot = renumber[condition.slot as usize];
                if let Operand::Attribute(slot) = &mut condition.operand {
                    *slot = renumber[*slot as usize];
                }
            }
        }
        Ok(Policy { forbids: forbids.into(), permits: permits.into(), paths: paths.into_iter().flatten().collect() })
    }

    fn rule(&mut self, raw: RawRule) -> Result<Rule, RuleError> {
        let id = raw.id;
        let fail = |message: String| RuleError { id: id.clone(), message };
        if id.is_empty() || id.len() > ID_BYTES_MAX {
            return Err(fail(format!("the id must be 1 to {ID_BYTES_MAX} bytes")));
        }
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')) {
            return Err(fail("the id may contain only ASCII letters, digits and `-_.:`".into()));
        }
        if raw.actions.is_empty() {
            return Err(fail("`actions` must list at least one action pattern".into()));
        }
        if raw.actions.len() > ACTIONS_PER_RULE_MAX {
            return Err(fail(format!("more than {ACTIONS_PER_RULE_MAX} action patterns")));
        }
        let actions = raw.actions.iter().map(|a| action_pattern(a)).collect::<Result<Box<[_]>, _>>().map_err(fail)?;
        if raw.when.len() > CONDITIONS_PER_RULE_MAX {
            return Err(fail(format!("more than {CONDITIONS_PER_RULE_MAX} conditions")));
        }
        let mut conditions = Vec::with_capacity(raw.when.len());
        for (index, condition) in raw.when.into_iter().enumerate() {
            conditions.push(self.condition(condition).map_err(|e| fail(format!("condition {}: {e}", index + 1)))?);
        }
        if !raw.obligations.is_empty() && raw.effect == Effect::Forbid {
            return Err(fail("obligations are allowed only on permit rules".into()));
        }
        if raw.obligations.len() > OBLIGATIONS_PER_RULE_MAX {
            return Err(fail(format!("more than {OBLIGATIONS_PER_RULE_MAX} obligations")));
        }
        let mut obligations = Vec::with_capacity(raw.obligations.len());
        for (key, value) in raw.obligations {
            if key.is_empty() || key.len() > TEXT_BYTES_MAX || value.len() > TEXT_BYTES_MAX {
                return Err(fail(format!(
                    "an obligation key must be 1 to {TEXT_BYTES_MAX} bytes and its value at most {TEXT_BYTES_MAX}"
                )));
            }
            obligations.push((key.into_boxed_str(), value.into_boxed_str()));
        }
        Ok(Rule { id: id.into_boxed_str(), actions, conditions: conditions.into(), obligations: obligations.into() })
    }

    fn condition(&mut self, raw: RawCondition) -> Result<Condition, String> {
        let op = raw.op;
        let slot = self.slot(&raw.attr).map_err(|e| format!("`attr`: {e}"))?;
        let operand = match (op, raw.value, raw.reference) {
            (_, Some(_), Some(_)) => return Err("give either `value` or `ref`, not both".into()),
            (Operator::Exists | Operator::Absent, None, None) => Operand::None,
            (Operator::Exists | Operator::Absent, _, _) => {
                return Err(format!("`{}` takes no `value` or `ref`", op.name()));
            }
            (_, None, None) => return Err(format!("`{}` needs a `value` or a `ref`", op.name())),
            (_, None, Some(reference)) => Operand::Attribute(self.slot(&reference).map_err(|e| format!("`ref`: {e}"))?),
            (_, Some(json), None) => literal_operand(op, json)?,
        };
        Ok(Condition { slot, op, operand })
    }

    fn slot(&mut self, path: &str) -> Result<Slot, String> {
        if path.len() > TEXT_BYTES_MAX {
            return Err(format!("attribute paths are at most {TEXT_BYTES_MAX} bytes"));
        }
        let (scope, name) = match path.split_once('.') {
            Some(("principal", name)) => (Scope::Principal, name),
            Some(("resource", name)) => (Scope::Resource, name),
            Some(("context", name)) => (Scope::Context, name),
            _ => {
                return Err(format!(
                    "{path:?} is not an attribute path: write `principal.<name>`, `resource.<name>` or `context.<name>`"
                ));
            }
        };
        if name.is_empty() {
            return Err(format!("{path:?} has no attribute name after the scope"));
        }
        let next = self.slots.len() as Slot;
        let slot = *self.slots.entry((scope, name.into())).or_insert(next);
        if slot == next {
            self.uses.push(0);
        }
        self.uses[slot as usize] += 1;
        Ok(slot)
    }
}

/// A rule-level error, before the rule's position is added.
struct RuleError {
    id: String,
    message: String,
}

impl RuleError {
    fn rule_label(&self) -> String {
        if self.id.is_empty() { "no id".into() } else { format!("{:?}", self.id) }
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn action_pattern(pattern: &str) -> Result<ActionPattern, String> {
    if pattern.is_empty() || pattern.len() > TEXT_BYTES_MAX {
        return Err(format!("action patterns must be 1 to {TEXT_BYTES_MAX} bytes"));
    }
    if pattern == "*" {
        return Ok(ActionPattern::Any);
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        if prefix.len() > 1 && prefix.ends_with(':') && !prefix.contains('*') {
            return Ok(ActionPattern::Prefix(prefix.into()));
        }
    } else if !pattern.contains('*') {
        return Ok(ActionPattern::Exact(pattern.into()));
    }
    Err(format!("action pattern {pattern:?}: `*` may only stand alone or end a `prefix:*` pattern"))
}

/// The literal operand of `op`, checked for the type `op` needs.
fn literal_operand(op: Operator, json: serde_json::Value) -> Result<Operand, String> {
    let value = literal(json)?;
    let fits = match op {
        Operator::Eq | Operator::Ne => true,
        Operator::In => matches!(value, Value::Texts(_)),
        Operator::Contains | Operator::Prefix => matches!(value, Value::Text(_)),
        Operator::Lt | Operator::Le | Operator::Gt | Operator::Ge => {
            matches!(value, Value::Integer(_) | Value::Number(_))
        }
        Operator::Exists | Operator::Absent => false,
    };
    if !fits {
        let wanted = match op {
            Operator::In => "a list of strings",
            Operator::Contains | Operator::Prefix => "a string",
            _ => "a number",
        };
        return Err(format!("the `value` of `{}` must be {wanted}", op.name()));
    }
    Ok(match (op, value) {
        (Operator::In, Value::Texts(mut list)) => {
            list.sort_unstable();
            list.dedup();
            Operand::SortedTexts(list.into())
        }
        (_, value) => Operand::Literal(value),
    })
}

/// A JSON literal as a [`Value`]: string, integer (when it fits in i64), other number,
/// boolean, or list of strings.
fn literal(json: serde_json::Value) -> Result<Value, String> {
    let too_long = || format!("texts in a `value` are at most {TEXT_BYTES_MAX} bytes");
    match json {
        serde_json::Value::String(s) if s.len() > TEXT_BYTES_MAX => Err(too_long()),
        serde_json::Value::String(s) => Ok(Value::Text(s)),
        serde_json::Value::Bool(b) => Ok(Value::Boolean(b)),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Value::Integer(i)),
            (None, Some(f)) if f.is_finite() => Ok(Value::Number(f)),
            _ => Err(format!("the number {n} cannot be represented")),
        },
        serde_json::Value::Array(items) => {
            if items.len() > LIST_ITEMS_MAX {
                return Err(format!("lists in a `value` have at most {LIST_ITEMS_MAX} items"));
            }
            let mut texts = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    serde_json::Value::String(s) if s.len() > TEXT_BYTES_MAX => return Err(too_long()),
                    serde_json::Value::String(s) => texts.push(s),
                    _ => return Err("a list `value` may contain only strings".into()),
                }
            }
            Ok(Value::Texts(texts))
        }
        serde_json::Value::Null | serde_json::Value::Object(_) => {
            Err("`value` must be a string, a number, a boolean or a list of strings".into())
        }
    }
}

#[cfg(test)]
mod tests;
