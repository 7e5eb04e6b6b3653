//! Translates an ABAC rule document (the format of `policies/README.md`, evaluated by
//! `abac-engine`) into an equivalent Cedar policy set, and access requests into Cedar
//! requests, so that the same decisions can be made and timed with the `cedar-policy` crate.
//!
//! Both languages decide the same way: default deny, forbid overrides permit, a rule
//! applies when its action and all of its conditions match. The mapping:
//!
//! - each rule becomes one `permit` or `forbid` policy annotated `@id("<rule id>")`, so that
//!   Cedar's reasons can be compared with the engine's;
//! - action patterns: `*` leaves the action unconstrained, `kind:verb` is
//!   `Action::"kind:verb"`, and `kind:*` is the action group `Action::"kind:*"`; a request's
//!   action entity gets as parents the groups whose prefix it starts with;
//! - each condition reads its attributes behind `has` guards, so that a missing attribute
//!   makes the condition false, as in the engine, rather than an evaluation error;
//! - operators: `eq` is `==`, `ne` is `!=`, `in` is `[..].contains(a)`, `contains` is
//!   `a.contains(b)`, `prefix` is `like "b*"`, `lt` `le` `gt` `ge` are `<` `<=` `>` `>=` on
//!   Longs or `lessThan()`... on decimals, `exists` is `has`, `absent` is `!(.. has ..)`;
//! - values: text is String, integer is Long, number is decimal, boolean is Bool, texts is
//!   Set of String.
//!
//! What does not carry over is refused with an error: `eq`/`ne` against a list literal (Cedar
//! sets are unordered, the engine's lists are not), numbers with more than four decimals,
//! `prefix` against another attribute. Two semantic differences remain, which the requests
//! must avoid: comparisons are typed by the literal (an integer literal compares Longs, a
//! number literal decimals) and between two attributes they assume Longs, while the engine
//! compares integers and numbers by value; and a list compared with `eq` to another
//! attribute compares in order in the engine, as a set in Cedar.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::str::FromStr;

use anyhow::{Context as _, anyhow, bail, ensure};
use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicySet, Request, Response,
    RestrictedExpression,
};
use nops_core::plugin::call::{AccessRequest, Attribute, Value};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    version: u64,
    #[serde(default)]
    #[allow(dead_code)] // For people.
    description: Option<String>,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    id: String,
    #[serde(default)]
    #[allow(dead_code)] // For people.
    description: Option<String>,
    effect: String,
    actions: Vec<String>,
    #[serde(default)]
    when: Vec<Condition>,
    #[serde(default)]
    #[allow(dead_code)] // Outputs of an allow; they do not change the decision.
    obligations: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Condition {
    attr: String,
    op: String,
    #[serde(default)]
    value: Option<serde_json::Value>,
    #[serde(default, rename = "ref")]
    reference: Option<String>,
}

/// A rule document as a Cedar policy set, with what is needed to build requests for it.
pub struct CedarAbac {
    policies: PolicySet,
    /// The prefixes of the `kind:*` action groups the policies use, with the group's uid.
    groups: Vec<(String, EntityUid)>,
    /// Rule id of each policy, by Cedar policy id.
    rule_ids: HashMap<String, String>,
    text: String,
    authorizer: Authorizer,
}

/// Cedar's answer, in the engine's terms.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Allowed or not.
    pub allow: bool,
    /// Ids of the deciding rules, sorted; empty on a default deny.
    pub reasons: Vec<String>,
    /// Evaluation errors (a policy that errs is skipped); the translation avoids them.
    pub errors: usize,
}

impl CedarAbac {
    /// Translates a JSON rule document and parses the result with `PolicySet::from_str`.
    pub fn from_document(json: &[u8]) -> anyhow::Result<Self> {
        let document: Document = serde_json::from_slice(json).context("reading the rule document")?;
        ensure!(document.version == 1, "unsupported rule document version {}", document.version);
        let mut text = String::new();
        let mut groups: Vec<String> = Vec::new();
        for rule in &document.rules {
            translate_rule(rule, &mut text, &mut groups).with_context(|| format!("rule {:?}", rule.id))?;
        }
        let policies = PolicySet::from_str(&text).map_err(|e| anyhow!("the translated policy set: {e:?}"))?;
        let mut rule_ids = HashMap::new();
        for policy in policies.policies() {
            let id = policy.annotation("id").ok_or_else(|| anyhow!("policy {} has no @id", policy.id()))?;
            rule_ids.insert(policy.id().to_string(), id.to_string());
        }
        ensure!(
            rule_ids.len() == document.rules.len(),
            "{} policies for {} rules",
            rule_ids.len(),
            document.rules.len()
        );
        let groups = groups
            .into_iter()
            .map(|prefix| {
                let uid = action_uid(&format!("{prefix}*"))?;
                Ok((prefix, uid))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { policies, groups, rule_ids, text, authorizer: Authorizer::new() })
    }

    /// The policy set in Cedar's syntax.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.rule_ids.len()
    }

    /// The Cedar request and entities of an access request: the principal `User::"<subject>"`
    /// and the resource `Resource::"<id>"` carry the request's attributes, the context its
    /// context, and the action entity its groups. When a name occurs twice in a scope, the
    /// first counts, as in the engine.
    pub fn request(&self, request: &AccessRequest) -> anyhow::Result<(Request, Entities)> {
        let principal = entity("User", &request.principal, "subject", "anonymous")?;
        let resource = entity("Resource", &request.resource, "id", "resource")?;
        let action = action_uid(&request.action)?;
        let parents: Vec<EntityUid> = self
            .groups
            .iter()
            .filter(|(prefix, _)| request.action.starts_with(prefix.as_str()))
            .map(|(_, uid)| uid.clone())
            .collect();
        let action_entity = Entity::new_no_attrs(action.clone(), parents.into_iter().collect());
        let context = Context::from_pairs(first_of_each(&request.context)?).map_err(|e| anyhow!("context: {e}"))?;
        let cedar = Request::new(principal.uid(), action, resource.uid(), context, None)
            .map_err(|e| anyhow!("request: {e}"))?;
        let entities = Entities::from_entities([principal, resource, action_entity], None)
            .map_err(|e| anyhow!("entities: {e}"))?;
        Ok((cedar, entities))
    }

    /// Decides a request built by [`CedarAbac::request`].
    pub fn decide(&self, request: &Request, entities: &Entities) -> Response {
        self.authorizer.is_authorized(request, &self.policies, entities)
    }

    /// A response in the engine's terms.
    pub fn outcome(&self, response: &Response) -> Outcome {
        let mut reasons: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| self.rule_ids.get(AsRef::<str>::as_ref(id)).cloned().unwrap_or_else(|| id.to_string()))
            .collect();
        reasons.sort();
        Outcome {
            allow: response.decision() == Decision::Allow,
            reasons,
            errors: response.diagnostics().errors().count(),
        }
    }
}

fn type_name(name: &str) -> anyhow::Result<EntityTypeName> {
    EntityTypeName::from_str(name).map_err(|e| anyhow!("entity type {name}: {e}"))
}

fn action_uid(action: &str) -> anyhow::Result<EntityUid> {
    Ok(EntityUid::from_type_name_and_id(type_name("Action")?, EntityId::new(action)))
}

/// An entity of type `kind` whose id is the text attribute `id_attribute` (or `fallback`) and
/// whose attributes are `attributes`.
fn entity(kind: &str, attributes: &[Attribute], id_attribute: &str, fallback: &str) -> anyhow::Result<Entity> {
    let id = attributes
        .iter()
        .find(|a| a.name == id_attribute)
        .and_then(|a| match &a.value {
            Value::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .unwrap_or(fallback);
    let uid = EntityUid::from_type_name_and_id(type_name(kind)?, EntityId::new(id));
    let attrs: HashMap<String, RestrictedExpression> = first_of_each(attributes)?.into_iter().collect();
    Entity::new(uid, attrs, HashSet::new()).map_err(|e| anyhow!("{kind} attributes: {e}"))
}

/// The attributes as Cedar values, the first of each name only.
fn first_of_each(attributes: &[Attribute]) -> anyhow::Result<Vec<(String, RestrictedExpression)>> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(attributes.len());
    for attribute in attributes {
        if seen.insert(attribute.name.as_str()) {
            out.push((attribute.name.clone(), cedar_value(&attribute.value)?));
        }
    }
    Ok(out)
}

fn cedar_value(value: &Value) -> anyhow::Result<RestrictedExpression> {
    Ok(match value {
        Value::Text(t) => RestrictedExpression::new_string(t.clone()),
        Value::Integer(i) => RestrictedExpression::new_long(*i),
        Value::Number(n) => RestrictedExpression::new_decimal(decimal(*n)?),
        Value::Boolean(b) => RestrictedExpression::new_bool(*b),
        Value::Texts(list) => {
            RestrictedExpression::new_set(list.iter().map(|t| RestrictedExpression::new_string(t.clone())))
        }
    })
}

/// `n` as a Cedar decimal literal (four fractional digits), if it is exactly one.
fn decimal(n: f64) -> anyhow::Result<String> {
    let scaled = (n * 10_000.0).round();
    ensure!(
        n.is_finite() && scaled.abs() < 9.0e18 && scaled / 10_000.0 == n,
        "{n} is not a decimal with at most four fractional digits"
    );
    let scaled = scaled as i64;
    let sign = if scaled < 0 { "-" } else { "" };
    let abs = scaled.unsigned_abs();
    Ok(format!("{sign}{}.{:04}", abs / 10_000, abs % 10_000))
}

/// A Cedar string literal.
fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A `like` pattern matching every string that starts with `prefix`.
fn prefix_pattern(prefix: &str) -> String {
    let quoted = string(prefix);
    format!("{}*\"", &quoted[..quoted.len() - 1].replace('*', "\\*"))
}

const RESERVED: &[&str] = &[
    "true",
    "false",
    "if",
    "then",
    "else",
    "in",
    "is",
    "like",
    "has",
    "principal",
    "action",
    "resource",
    "context",
    "permit",
    "forbid",
    "when",
    "unless",
    "__cedar",
];

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !RESERVED.contains(&name)
}

/// An attribute path of the engine (`principal.team`) as Cedar's `has` test and access.
fn attribute(path: &str) -> anyhow::Result<(String, String)> {
    let (scope, name) = path.split_once('.').ok_or_else(|| anyhow!("{path:?} is not an attribute path"))?;
    ensure!(
        matches!(scope, "principal" | "resource" | "context") && !name.is_empty(),
        "{path:?} is not an attribute path"
    );
    Ok(if is_identifier(name) {
        (format!("{scope} has {name}"), format!("{scope}.{name}"))
    } else {
        (format!("{scope} has {}", string(name)), format!("{scope}[{}]", string(name)))
    })
}

fn translate_rule(rule: &Rule, out: &mut String, groups: &mut Vec<String>) -> anyhow::Result<()> {
    let effect = match rule.effect.as_str() {
        "permit" | "forbid" => rule.effect.as_str(),
        other => bail!("unknown effect {other:?}"),
    };
    ensure!(!rule.actions.is_empty(), "no action pattern");
    let mut actions = Vec::new();
    let mut any = false;
    for pattern in &rule.actions {
        if pattern == "*" {
            any = true;
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            ensure!(prefix.len() > 1 && prefix.ends_with(':') && !prefix.contains('*'), "action pattern {pattern:?}");
            if !groups.iter().any(|g| g == prefix) {
                groups.push(prefix.to_string());
            }
            actions.push(format!("Action::{}", string(pattern)));
        } else {
            ensure!(!pattern.contains('*'), "action pattern {pattern:?}");
            actions.push(format!("Action::{}", string(pattern)));
        }
    }
    let action = match (any, actions.as_slice()) {
        (true, _) => "action".to_string(),
        (false, [one]) if !one.ends_with("*\"") => format!("action == {one}"),
        (false, [one]) => format!("action in {one}"),
        (false, many) => format!("action in [{}]", many.join(", ")),
    };
    let _ = writeln!(out, "@id({})", string(&rule.id));
    let _ = write!(out, "{effect} (principal, {action}, resource)");
    let conditions = rule.when.iter().map(condition).collect::<anyhow::Result<Vec<_>>>()?;
    if !conditions.is_empty() {
        let _ = write!(out, "\nwhen {{\n  {}\n}}", conditions.join("\n  && "));
    }
    out.push_str(";\n\n");
    Ok(())
}

/// One condition as a Cedar expression that is false, never an error, when an attribute it
/// reads is missing.
fn condition(c: &Condition) -> anyhow::Result<String> {
    let (has, a) = attribute(&c.attr)?;
    let op = c.op.as_str();
    match (op, &c.value, &c.reference) {
        ("exists", None, None) => return Ok(has),
        ("absent", None, None) => return Ok(format!("!({has})")),
        ("exists" | "absent", _, _) => bail!("`{op}` takes no operand"),
        (_, Some(_), Some(_)) | (_, None, None) => bail!("`{op}` needs exactly one of `value` and `ref`"),
        _ => {}
    }
    if let Some(reference) = &c.reference {
        let (has_b, b) = attribute(reference)?;
        let test = match op {
            "eq" => format!("{a} == {b}"),
            "ne" => format!("{a} != {b}"),
            "in" => format!("{b}.contains({a})"),
            "contains" => format!("{a}.contains({b})"),
            "lt" => format!("{a} < {b}"),
            "le" => format!("{a} <= {b}"),
            "gt" => format!("{a} > {b}"),
            "ge" => format!("{a} >= {b}"),
            "prefix" => bail!("`prefix` against another attribute has no Cedar equivalent (`like` takes a literal)"),
            other => bail!("unknown operator {other:?}"),
        };
        return Ok(format!("({has} && {has_b} && {test})"));
    }
    let value = c.value.as_ref().ok_or_else(|| anyhow!("`{op}` needs a value"))?;
    let test = match (op, value) {
        ("eq" | "ne", serde_json::Value::Array(_)) => {
            bail!("`{op}` against a list: the engine compares lists in order, Cedar as sets")
        }
        ("eq" | "ne", v) => format!("{a} {} {}", if op == "eq" { "==" } else { "!=" }, literal(v)?),
        ("in", serde_json::Value::Array(items)) => {
            let items = items
                .iter()
                .map(|i| i.as_str().map(string).ok_or_else(|| anyhow!("`in` lists hold strings")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            format!("[{}].contains({a})", items.join(", "))
        }
        ("contains", serde_json::Value::String(s)) => format!("{a}.contains({})", string(s)),
        ("prefix", serde_json::Value::String(s)) => format!("{a} like {}", prefix_pattern(s)),
        ("lt" | "le" | "gt" | "ge", serde_json::Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                let symbol = match op {
                    "lt" => "<",
                    "le" => "<=",
                    "gt" => ">",
                    _ => ">=",
                };
                format!("{a} {symbol} {i}")
            } else {
                let method = match op {
                    "lt" => "lessThan",
                    "le" => "lessThanOrEqual",
                    "gt" => "greaterThan",
                    _ => "greaterThanOrEqual",
                };
                let f = n.as_f64().ok_or_else(|| anyhow!("the number {n}"))?;
                format!("{a}.{method}(decimal(\"{}\"))", decimal(f)?)
            }
        }
        (other, v) => bail!("operator {other:?} with operand {v}"),
    };
    Ok(format!("({has} && {test})"))
}

/// A literal operand of `eq`/`ne`.
fn literal(v: &serde_json::Value) -> anyhow::Result<String> {
    Ok(match v {
        serde_json::Value::String(s) => string(s),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => i.to_string(),
            None => format!("decimal(\"{}\")", decimal(n.as_f64().ok_or_else(|| anyhow!("the number {n}"))?)?),
        },
        other => bail!("literal {other}"),
    })
}
