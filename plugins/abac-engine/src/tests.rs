use super::*;

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn texts(items: &[&str]) -> Value {
    Value::Texts(items.iter().map(|s| s.to_string()).collect())
}

fn attrs(pairs: &[(&str, Value)]) -> Vec<Attribute> {
    pairs.iter().map(|(n, v)| Attribute::new(*n, v.clone())).collect()
}

fn policy(rules: &str) -> Policy {
    let document = format!(r#"{{ "version": 1, "rules": [ {rules} ] }}"#);
    Policy::from_json(document.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn parse_error(document: &str) -> String {
    match Policy::from_json(document.as_bytes()) {
        Ok(_) => panic!("accepted: {document}"),
        Err(e) => e.to_string(),
    }
}

fn rules_error(rules: &str) -> String {
    parse_error(&format!(r#"{{ "version": 1, "rules": [ {rules} ] }}"#))
}

/// A permit rule on every action with one condition.
fn one_condition(condition: &str) -> Policy {
    policy(&format!(r#"{{ "id": "r", "effect": "permit", "actions": ["*"], "when": [ {condition} ] }}"#))
}

/// Evaluates `p` for action `a:b` with the given attributes.
fn decide(p: &Policy, principal: &[Attribute], resource: &[Attribute], context: &[Attribute]) -> bool {
    let request = Request { principal, action: "a:b", resource, context };
    let decision = p.evaluate(&request);
    assert_eq!(decision.allow, p.is_allowed(&request), "evaluate and is_allowed disagree");
    decision.allow
}

/// Whether `principal.x <op> value` holds for the principal attribute `x = subject`.
fn holds(op: &str, value: &str, subject: Value) -> bool {
    let p = one_condition(&format!(r#"{{ "attr": "principal.x", "op": "{op}", "value": {value} }}"#));
    decide(&p, &attrs(&[("x", subject)]), &[], &[])
}

// ---- operators ----------------------------------------------------------------------------

#[test]
fn eq_compares_same_typed_values() {
    assert!(holds("eq", r#""admin""#, text("admin")));
    assert!(!holds("eq", r#""admin""#, text("Admin")));
    assert!(holds("eq", "true", Value::Boolean(true)));
    assert!(!holds("eq", "true", Value::Boolean(false)));
    assert!(holds("eq", r#"["a", "b"]"#, texts(&["a", "b"])));
    assert!(!holds("eq", r#"["a", "b"]"#, texts(&["b", "a"])), "list equality is ordered");
    // A different type is never equal, even when it "looks" the same.
    assert!(!holds("eq", r#""1""#, Value::Integer(1)));
    assert!(!holds("eq", "1", Value::Boolean(true)));
}

#[test]
fn eq_compares_integers_and_numbers_by_value() {
    assert!(holds("eq", "3", Value::Integer(3)));
    assert!(holds("eq", "3", Value::Number(3.0)));
    assert!(holds("eq", "3.0", Value::Integer(3)));
    assert!(!holds("eq", "3.5", Value::Integer(3)));
    assert!(!holds("eq", "3", Value::Number(f64::NAN)));
    // Exact beyond 2^53: 2^53 + 1 is not equal to the float 2^53.
    assert!(!holds("eq", "9007199254740992.0", Value::Integer(9_007_199_254_740_993)));
    assert!(holds("eq", "9007199254740993", Value::Integer(9_007_199_254_740_993)));
}

#[test]
fn ne_is_true_only_when_both_present_and_different() {
    assert!(holds("ne", r#""a""#, text("b")));
    assert!(!holds("ne", r#""a""#, text("a")));
    assert!(holds("ne", r#""1""#, Value::Integer(1)), "another type is different");
    assert!(!holds("ne", "2", Value::Number(2.0)));
}

#[test]
fn in_tests_membership_of_a_text() {
    assert!(holds("in", r#"["operator", "viewer"]"#, text("viewer")));
    assert!(!holds("in", r#"["operator", "viewer"]"#, text("admin")));
    assert!(!holds("in", r#"["1"]"#, Value::Integer(1)), "only a text can be in a list of texts");
    assert!(!holds("in", "[]", text("")), "an empty list contains nothing");
    // Long, unsorted, duplicated lists are sorted and deduplicated at parse time.
    let long: Vec<String> = (0..200).rev().map(|i| format!("\"r{i}\"")).chain(["\"r7\"".into()]).collect();
    let list = format!("[{}]", long.join(","));
    for i in [0, 7, 100, 199] {
        assert!(holds("in", &list, text(&format!("r{i}"))));
    }
    assert!(!holds("in", &list, text("r200")));
}

#[test]
fn contains_tests_membership_in_a_list_attribute() {
    assert!(holds("contains", r#""gpu""#, texts(&["cpu", "gpu"])));
    assert!(!holds("contains", r#""tpu""#, texts(&["cpu", "gpu"])));
    assert!(!holds("contains", r#""gpu""#, text("gpu")), "a text attribute is not a list");
}

#[test]
fn ordering_operators_compare_numbers() {
    for (op, expect) in [
        ("lt", [true, false, false]),
        ("le", [true, true, false]),
        ("gt", [false, false, true]),
        ("ge", [false, true, true]),
    ] {
        for (subject, expected) in [9, 10, 11].into_iter().zip(expect) {
            assert_eq!(holds(op, "10", Value::Integer(subject)), expected, "{subject} {op} 10");
            assert_eq!(holds(op, "10.0", Value::Integer(subject)), expected, "{subject} {op} 10.0");
            assert_eq!(holds(op, "10", Value::Number(subject as f64)), expected, "{subject}.0 {op} 10");
        }
    }
    assert!(holds("lt", "10.5", Value::Integer(10)));
    assert!(holds("gt", "-10.5", Value::Integer(-10)));
    assert!(!holds("lt", "-10.5", Value::Integer(-10)));
    assert!(holds("gt", "-1e300", Value::Integer(i64::MIN)));
    assert!(holds("lt", "1e300", Value::Integer(i64::MAX)));
    // Not numeric, or NaN: false for every ordering.
    for op in ["lt", "le", "gt", "ge"] {
        assert!(!holds(op, "10", text("5")));
        assert!(!holds(op, "10", Value::Number(f64::NAN)));
    }
}

#[test]
fn prefix_tests_the_start_of_a_text() {
    assert!(holds("prefix", r#""eu-""#, text("eu-west-1")));
    assert!(!holds("prefix", r#""eu-""#, text("us-east-1")));
    assert!(holds("prefix", r#""""#, text("anything")));
    assert!(!holds("prefix", r#""eu""#, texts(&["eu"])));
}

#[test]
fn exists_and_absent() {
    let exists = one_condition(r#"{ "attr": "principal.x", "op": "exists" }"#);
    let absent = one_condition(r#"{ "attr": "principal.x", "op": "absent" }"#);
    let with = attrs(&[("x", Value::Boolean(false))]);
    assert!(decide(&exists, &with, &[], &[]));
    assert!(!decide(&exists, &[], &[], &[]));
    assert!(!decide(&absent, &with, &[], &[]));
    assert!(decide(&absent, &[], &[], &[]));
}

#[test]
fn ref_compares_two_attributes_across_scopes() {
    let p = one_condition(r#"{ "attr": "principal.tenant", "op": "eq", "ref": "resource.tenant" }"#);
    let acme = attrs(&[("tenant", text("acme"))]);
    let globex = attrs(&[("tenant", text("globex"))]);
    assert!(decide(&p, &acme, &acme, &[]));
    assert!(!decide(&p, &acme, &globex, &[]));

    let p = one_condition(r#"{ "attr": "principal.role", "op": "in", "ref": "resource.roles" }"#);
    let roles = attrs(&[("roles", texts(&["operator", "viewer"]))]);
    assert!(decide(&p, &attrs(&[("role", text("viewer"))]), &roles, &[]));
    assert!(!decide(&p, &attrs(&[("role", text("admin"))]), &roles, &[]));

    let p = one_condition(r#"{ "attr": "context.hour", "op": "lt", "ref": "resource.closes_at" }"#);
    let closes = attrs(&[("closes_at", Value::Integer(18))]);
    assert!(decide(&p, &[], &closes, &attrs(&[("hour", Value::Integer(17))])));
    assert!(!decide(&p, &[], &closes, &attrs(&[("hour", Value::Number(18.0))])));

    let p = one_condition(r#"{ "attr": "resource.labels", "op": "contains", "ref": "principal.team" }"#);
    let labels = attrs(&[("labels", texts(&["team=a", "team=b"]))]);
    assert!(decide(&p, &attrs(&[("team", text("team=b"))]), &labels, &[]));
    assert!(!decide(&p, &attrs(&[("team", text("team=c"))]), &labels, &[]));
}

// ---- semantics ----------------------------------------------------------------------------

const TENANT_RULES: &str = r#"
    { "id": "tenant-isolation", "effect": "forbid", "actions": ["*"],
      "when": [ { "attr": "principal.tenant", "op": "ne", "ref": "resource.tenant" } ] },
    { "id": "admins-everything", "effect": "permit", "actions": ["*"],
      "when": [ { "attr": "principal.role", "op": "eq", "value": "admin" } ] },
    { "id": "operators-read-agents", "effect": "permit", "actions": ["agents:read", "agents:list"],
      "when": [ { "attr": "principal.role", "op": "in", "value": ["operator", "viewer"] } ],
      "obligations": [["mask", "labels.secret"]] },
    { "id": "readers-agents", "effect": "permit", "actions": ["agents:*"],
      "when": [ { "attr": "principal.role", "op": "eq", "value": "viewer" } ],
      "obligations": [["mask", "labels.secret"], ["audit", "read"]] }
"#;

#[test]
fn default_deny_when_no_rule_matches() {
    let p = policy(TENANT_RULES);
    let principal = attrs(&[("role", text("guest")), ("tenant", text("acme"))]);
    let resource = attrs(&[("tenant", text("acme"))]);
    let d = p.evaluate(&Request {
        principal: &principal[..],
        action: "agents:read",
        resource: &resource[..],
        context: NO_ATTRIBUTES,
    });
    assert_eq!(d, Decision { allow: false, reasons: vec![DEFAULT_DENY_REASON], obligations: vec![] });

    let empty = policy("");
    assert!(!empty.is_allowed(&Request {
        principal: &principal[..],
        action: "x",
        resource: &resource[..],
        context: NO_ATTRIBUTES
    }));
}

#[test]
fn permit_lists_every_matching_rule_and_merges_obligations() {
    let p = policy(TENANT_RULES);
    let principal = attrs(&[("role", text("viewer")), ("tenant", text("acme"))]);
    let resource = attrs(&[("tenant", text("acme"))]);
    let d = p.evaluate(&Request {
        principal: &principal[..],
        action: "agents:read",
        resource: &resource[..],
        context: NO_ATTRIBUTES,
    });
    assert!(d.allow);
    assert_eq!(d.reasons, ["operators-read-agents", "readers-agents"]);
    assert_eq!(d.obligations, [("mask", "labels.secret"), ("audit", "read")], "in order, without duplicates");

    let admin = attrs(&[("role", text("admin")), ("tenant", text("acme"))]);
    let d = p.evaluate(&Request {
        principal: &admin[..],
        action: "keys:create",
        resource: &resource[..],
        context: NO_ATTRIBUTES,
    });
    assert_eq!((d.allow, d.reasons, d.obligations), (true, vec!["admins-everything"], vec![]));
}

#[test]
fn forbid_overrides_permit() {
    let p = policy(TENANT_RULES);
    let admin = attrs(&[("role", text("admin")), ("tenant", text("acme"))]);
    let other = attrs(&[("tenant", text("globex"))]);
    let d = p.evaluate(&Request {
        principal: &admin[..],
        action: "agents:read",
        resource: &other[..],
        context: NO_ATTRIBUTES,
    });
    assert_eq!(d, Decision { allow: false, reasons: vec!["tenant-isolation"], obligations: vec![] });

    // Every matching forbid is a reason, in document order, after the permits are gone.
    let p = policy(
        r#"{ "id": "p", "effect": "permit", "actions": ["*"] },
           { "id": "f2", "effect": "forbid", "actions": ["x:*"] },
           { "id": "f1", "effect": "forbid", "actions": ["*"] },
           { "id": "f3", "effect": "forbid", "actions": ["y:*"] }"#,
    );
    let d = p.evaluate(&Request {
        principal: NO_ATTRIBUTES,
        action: "x:go",
        resource: NO_ATTRIBUTES,
        context: NO_ATTRIBUTES,
    });
    assert_eq!(d, Decision { allow: false, reasons: vec!["f2", "f1"], obligations: vec![] });
}

#[test]
fn missing_attributes_make_conditions_false() {
    let p = policy(TENANT_RULES);
    // No resource tenant: the tenant-isolation forbid cannot match, so it does not apply.
    let admin = attrs(&[("role", text("admin")), ("tenant", text("acme"))]);
    assert!(p.is_allowed(&Request {
        principal: &admin[..],
        action: "agents:read",
        resource: NO_ATTRIBUTES,
        context: NO_ATTRIBUTES
    }));
    // No role: no permit matches.
    let anonymous = attrs(&[("tenant", text("acme"))]);
    assert!(!p.is_allowed(&Request {
        principal: &anonymous[..],
        action: "agents:read",
        resource: &anonymous[..],
        context: NO_ATTRIBUTES
    }));

    // Every operator, literal or ref, is false on a missing attribute (absent aside).
    for op in ["eq", "ne", "in", "contains", "lt", "le", "gt", "ge", "prefix"] {
        let value = match op {
            "in" => r#"["a"]"#,
            "lt" | "le" | "gt" | "ge" => "1",
            _ => r#""a""#,
        };
        let literal = one_condition(&format!(r#"{{ "attr": "principal.missing", "op": "{op}", "value": {value} }}"#));
        let by_ref = one_condition(&format!(r#"{{ "attr": "principal.x", "op": "{op}", "ref": "context.missing" }}"#));
        let x = attrs(&[("x", text("a"))]);
        assert!(!decide(&literal, &x, &[], &[]), "{op} on a missing attribute");
        assert!(!decide(&by_ref, &x, &[], &[]), "{op} with a missing ref");
    }
    let exists = one_condition(r#"{ "attr": "principal.missing", "op": "exists" }"#);
    assert!(!decide(&exists, &attrs(&[("x", text("a"))]), &[], &[]));

    // `absent` is how a forbid covers a missing attribute.
    let p = policy(&format!(
        r#"{TENANT_RULES}, {{ "id": "resource-tenant-required", "effect": "forbid", "actions": ["*"],
             "when": [ {{ "attr": "resource.tenant", "op": "absent" }} ] }}"#
    ));
    let d = p.evaluate(&Request {
        principal: &admin[..],
        action: "agents:read",
        resource: NO_ATTRIBUTES,
        context: NO_ATTRIBUTES,
    });
    assert_eq!(d.reasons, ["resource-tenant-required"]);
}

#[test]
fn action_patterns() {
    let p = policy(r#"{ "id": "r", "effect": "permit", "actions": ["agents:read", "keys:*"] }"#);
    let allowed = |action: &str| {
        p.is_allowed(&Request { principal: NO_ATTRIBUTES, action, resource: NO_ATTRIBUTES, context: NO_ATTRIBUTES })
    };
    assert!(allowed("agents:read"));
    assert!(!allowed("agents:reader"));
    assert!(!allowed("agents:write"));
    assert!(allowed("keys:create"));
    assert!(allowed("keys:a:b"));
    assert!(!allowed("keys"));
    assert!(!allowed("keysx:create"));
}

#[test]
fn conditions_are_all_required() {
    let p = policy(
        r#"{ "id": "r", "effect": "permit", "actions": ["*"], "when": [
             { "attr": "principal.role", "op": "eq", "value": "operator" },
             { "attr": "context.hour", "op": "ge", "value": 8 },
             { "attr": "context.hour", "op": "lt", "value": 18 } ] }"#,
    );
    let operator = attrs(&[("role", text("operator"))]);
    for (hour, expected) in [(7, false), (8, true), (17, true), (18, false)] {
        assert_eq!(decide(&p, &operator, &[], &attrs(&[("hour", Value::Integer(hour))])), expected, "hour {hour}");
    }
    assert!(!decide(&p, &attrs(&[("role", text("viewer"))]), &[], &attrs(&[("hour", Value::Integer(9))])));
}

#[test]
fn duplicate_request_attributes_use_the_first() {
    let p = one_condition(r#"{ "attr": "principal.role", "op": "eq", "value": "admin" }"#);
    assert!(decide(&p, &attrs(&[("role", text("admin")), ("role", text("viewer"))]), &[], &[]));
    assert!(!decide(&p, &attrs(&[("role", text("viewer")), ("role", text("admin"))]), &[], &[]));
}

#[test]
fn borrowed_pairs_are_attributes_too() {
    let p = one_condition(r#"{ "attr": "principal.groups", "op": "contains", "value": "ops" }"#);
    let groups = vec!["dev".to_string(), "ops".to_string()];
    let principal = [("groups", ValueRef::Texts(&groups))];
    let none: &[(&str, ValueRef)] = &[];
    assert!(p.is_allowed(&Request { principal: &principal[..], action: "a", resource: none, context: none }));
}

#[test]
fn many_distinct_attributes_beyond_the_slot_cache() {
    // 150 distinct attributes: some slots are not cached and are looked up each time.
    let rules: Vec<String> = (0..150)
        .map(|i| {
            format!(
                r#"{{ "id": "r{i}", "effect": "permit", "actions": ["*"],
                     "when": [ {{ "attr": "context.a{i}", "op": "eq", "value": {i} }},
                               {{ "attr": "context.a{i}", "op": "ge", "value": 0 }} ] }}"#
            )
        })
        .collect();
    let p = policy(&rules.join(","));
    assert_eq!(p.rule_count(), 150);
    for i in [0, 63, 64, 149] {
        let context = attrs(&[(&format!("a{i}"), Value::Integer(i))]);
        let d = p.evaluate(&Request {
            principal: NO_ATTRIBUTES,
            action: "a",
            resource: NO_ATTRIBUTES,
            context: &context[..],
        });
        let id = format!("r{i}");
        assert_eq!(d.reasons, [id.as_str()]);
    }
}

// ---- bad documents and limits -------------------------------------------------------------

#[test]
fn rejects_malformed_documents() {
    assert!(parse_error("").contains("empty"));
    assert!(parse_error("  \n").contains("empty"));
    assert!(parse_error("{").contains("invalid rule document"));
    assert!(parse_error("[]").contains("invalid rule document"));
    assert!(parse_error(r#"{ "rules": [] }"#).contains("missing field `version`"));
    assert!(parse_error(r#"{ "version": 1 }"#).contains("missing field `rules`"));
    assert!(parse_error(r#"{ "version": 2, "rules": [] }"#).contains("unsupported version 2"));
    assert!(parse_error(r#"{ "version": 1, "rules": [], "extra": 1 }"#).contains("unknown field `extra`"));
    assert!(Policy::from_json(br#"{ "version": 1, "description": "none", "rules": [] }"#).is_ok());
}

#[test]
fn rejects_unknown_fields_and_operators() {
    let e = rules_error(r#"{ "id": "r", "effect": "permit", "actions": ["*"], "condition": [] }"#);
    assert!(e.contains("unknown field `condition`"), "{e}");
    let e = rules_error(r#"{ "id": "r", "effect": "allow", "actions": ["*"] }"#);
    assert!(e.contains("unknown variant `allow`"), "{e}");
    let e = rules_error(
        r#"{ "id": "r", "effect": "permit", "actions": ["*"], "when": [ { "attr": "principal.x", "op": "matches", "value": "a" } ] }"#,
    );
    assert!(e.contains("unknown variant `matches`"), "{e}");
    let e = rules_error(
        r#"{ "id": "r", "effect": "permit", "actions": ["*"], "when": [ { "attr": "principal.x", "op": "eq", "value": "a", "negate": true } ] }"#,
    );
    assert!(e.contains("unknown field `negate`"), "{e}");
}

#[test]
fn rejects_bad_rules_with_their_position() {
    let cases = [
        (r#"{ "id": "", "effect": "permit", "actions": ["*"] }"#, "rule 1 (no id): the id must be 1 to 128 bytes"),
        (r#"{ "id": "has space", "effect": "permit", "actions": ["*"] }"#, "may contain only"),
        (r#"{ "id": "r", "effect": "permit", "actions": [] }"#, "at least one action"),
        (r#"{ "id": "r", "effect": "permit", "actions": ["a*"] }"#, "`*` may only stand alone"),
        (r#"{ "id": "r", "effect": "permit", "actions": ["*:read"] }"#, "`*` may only stand alone"),
        (r#"{ "id": "r", "effect": "permit", "actions": [":*"] }"#, "`*` may only stand alone"),
        (r#"{ "id": "r", "effect": "permit", "actions": [""] }"#, "action patterns must be 1 to"),
        (r#"{ "id": "r", "effect": "forbid", "actions": ["*"], "obligations": [["a", "b"]] }"#, "only on permit rules"),
        (r#"{ "id": "r", "effect": "permit", "actions": ["*"], "obligations": [["", "b"]] }"#, "obligation key"),
        (r#"{ "id": "r", "effect": "permit", "actions": ["*"], "obligations": [["a"]] }"#, "invalid rule document"),
    ];
    for (rule, expected) in cases {
        let e = rules_error(rule);
        assert!(e.contains(expected), "{rule}: {e}");
    }
    let e = rules_error(
        r#"{ "id": "a", "effect": "permit", "actions": ["*"] }, { "id": "a", "effect": "forbid", "actions": ["*"] }"#,
    );
    assert_eq!(e, r#"rule 2 ("a"): duplicate id"#);
}

#[test]
fn rejects_bad_conditions() {
    let cases = [
        (r#"{ "attr": "role", "op": "eq", "value": "a" }"#, "is not an attribute path"),
        (r#"{ "attr": "user.role", "op": "eq", "value": "a" }"#, "is not an attribute path"),
        (r#"{ "attr": "principal.", "op": "eq", "value": "a" }"#, "no attribute name"),
        (r#"{ "attr": "principal.x", "op": "eq", "ref": "x" }"#, "`ref`: \"x\" is not an attribute path"),
        (r#"{ "attr": "principal.x", "op": "eq" }"#, "`eq` needs a `value` or a `ref`"),
        (r#"{ "attr": "principal.x", "op": "eq", "value": "a", "ref": "principal.y" }"#, "not both"),
        (r#"{ "attr": "principal.x", "op": "exists", "value": true }"#, "`exists` takes no"),
        (r#"{ "attr": "principal.x", "op": "absent", "ref": "principal.y" }"#, "`absent` takes no"),
        (r#"{ "attr": "principal.x", "op": "eq", "value": null }"#, "needs a `value`"),
        (r#"{ "attr": "principal.x", "op": "eq", "value": {} }"#, "must be a string, a number"),
        (r#"{ "attr": "principal.x", "op": "eq", "value": [1] }"#, "only strings"),
        (r#"{ "attr": "principal.x", "op": "in", "value": "a" }"#, "`in` must be a list of strings"),
        (r#"{ "attr": "principal.x", "op": "contains", "value": ["a"] }"#, "`contains` must be a string"),
        (r#"{ "attr": "principal.x", "op": "prefix", "value": 1 }"#, "`prefix` must be a string"),
        (r#"{ "attr": "principal.x", "op": "lt", "value": "1" }"#, "`lt` must be a number"),
        (r#"{ "attr": "principal.x", "op": "ge", "value": true }"#, "`ge` must be a number"),
    ];
    for (condition, expected) in cases {
        let e = rules_error(&format!(
            r#"{{ "id": "ok", "effect": "permit", "actions": ["*"] }},
               {{ "id": "bad", "effect": "permit", "actions": ["*"], "when": [ {{ "attr": "principal.y", "op": "exists" }}, {condition} ] }}"#
        ));
        assert!(e.starts_with(r#"rule 2 ("bad"): condition 2: "#), "{condition}: {e}");
        assert!(e.contains(expected), "{condition}: {e}");
    }
}

#[test]
fn enforces_limits() {
    let rule = |i: usize| format!(r#"{{ "id": "r{i}", "effect": "permit", "actions": ["*"] }}"#);
    let at_max: Vec<String> = (0..RULES_MAX).map(rule).collect();
    assert_eq!(policy(&at_max.join(",")).rule_count(), RULES_MAX);
    let over: Vec<String> = (0..=RULES_MAX).map(rule).collect();
    assert!(rules_error(&over.join(",")).contains(&format!("at most {RULES_MAX}")));

    let condition = r#"{ "attr": "principal.x", "op": "exists" }"#;
    let with = |n: usize| {
        format!(r#"{{ "id": "r", "effect": "permit", "actions": ["*"], "when": [{}] }}"#, vec![condition; n].join(","))
    };
    policy(&with(CONDITIONS_PER_RULE_MAX));
    assert!(rules_error(&with(CONDITIONS_PER_RULE_MAX + 1)).contains("more than 32 conditions"));

    let actions =
        |n: usize| format!(r#"{{ "id": "r", "effect": "permit", "actions": [{}] }}"#, vec!["\"a\""; n].join(","));
    policy(&actions(ACTIONS_PER_RULE_MAX));
    assert!(rules_error(&actions(ACTIONS_PER_RULE_MAX + 1)).contains("action patterns"));

    let obligations = |n: usize| {
        format!(
            r#"{{ "id": "r", "effect": "permit", "actions": ["*"], "obligations": [{}] }}"#,
            vec![r#"["k","v"]"#; n].join(",")
        )
    };
    policy(&obligations(OBLIGATIONS_PER_RULE_MAX));
    assert!(rules_error(&obligations(OBLIGATIONS_PER_RULE_MAX + 1)).contains("obligations"));

    let list = |n: usize| {
        format!(
            r#"{{ "id": "r", "effect": "permit", "actions": ["*"], "when": [ {{ "attr": "principal.x", "op": "in", "value": [{}] }} ] }}"#,
            vec!["\"a\""; n].join(",")
        )
    };
    policy(&list(LIST_ITEMS_MAX));
    assert!(rules_error(&list(LIST_ITEMS_MAX + 1)).contains("at most 256 items"));

    let long = "x".repeat(TEXT_BYTES_MAX + 1);
    assert!(
        rules_error(&format!(r#"{{ "id": "r", "effect": "permit", "actions": ["{long}"] }}"#))
            .contains("1 to 1024 bytes")
    );
    assert!(
        rules_error(&format!(r#"{{ "id": "r", "effect": "permit", "actions": ["*"], "when": [ {{ "attr": "principal.x", "op": "eq", "value": "{long}" }} ] }}"#))
            .contains("at most 1024 bytes")
    );
    let long_id = "i".repeat(ID_BYTES_MAX + 1);
    assert!(
        rules_error(&format!(r#"{{ "id": "{long_id}", "effect": "permit", "actions": ["*"] }}"#))
            .contains("1 to 128 bytes")
    );

    let mut huge = br#"{ "version": 1, "rules": [] }"#.to_vec();
    huge.resize(DOCUMENT_BYTES_MAX + 1, b' ');
    let e = Policy::from_json(&huge).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains(&format!("at most {DOCUMENT_BYTES_MAX}")), "{e}");
    huge.truncate(DOCUMENT_BYTES_MAX);
    assert!(Policy::from_json(&huge).is_ok(), "exactly the limit is accepted");
}

// ---- the shipped policies ------------------------------------------------------------------

const TENANT_ISOLATION: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/tenant-isolation.json"));
const BENCH_100_RULES: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/bench-100-rules.json"));

#[test]
fn shipped_policies_parse() {
    Policy::from_json(TENANT_ISOLATION.as_bytes()).unwrap();
    assert_eq!(Policy::from_json(BENCH_100_RULES.as_bytes()).unwrap().rule_count(), 100);
}

#[test]
fn tenant_isolation_policy_decisions() {
    let p = Policy::from_json(TENANT_ISOLATION.as_bytes()).unwrap();
    let who = |role: &str, tenant: Option<&str>, subject: &str| {
        let mut a = attrs(&[("role", text(role)), ("subject", text(subject))]);
        if let Some(t) = tenant {
            a.push(Attribute::new("tenant", text(t)));
        }
        a
    };
    let agent_in = |tenant: &str, id: &str, labels: &[&str]| {
        attrs(&[("tenant", text(tenant)), ("kind", text("agent")), ("id", text(id)), ("labels", texts(labels))])
    };
    let decide = |principal: &[Attribute], action: &str, resource: &[Attribute]| {
        let d = p.evaluate(&Request { principal, action, resource, context: NO_ATTRIBUTES });
        (d.allow, d.reasons.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    };
    let acme_agent = agent_in("acme", "a-1", &["zone=eu-1"]);
    let protected = agent_in("acme", "a-2", &["protected=true"]);
    let globex_agent = agent_in("globex", "g-1", &[]);

    let admin = who("admin", Some("acme"), "k-admin");
    assert!(decide(&admin, "keys:create", &attrs(&[("tenant", text("acme"))])).0);
    assert!(decide(&admin, "agents:delete", &protected).0);
    assert_eq!(decide(&admin, "agents:read", &globex_agent), (false, vec!["tenant-isolation".into()]));

    let root = who("admin", None, "k-root");
    assert!(decide(&root, "agents:read", &globex_agent).0, "a kernel-wide admin spans tenants");

    let operator = who("operator", Some("acme"), "k-op");
    assert!(decide(&operator, "agents:write", &acme_agent).0);
    assert!(decide(&operator, "plugins:read", &[]).0);
    assert!(!decide(&operator, "plugins:write", &[]).0);
    assert!(decide(&operator, "keys:read", &attrs(&[("tenant", text("acme"))])).0);
    assert!(!decide(&operator, "keys:create", &attrs(&[("tenant", text("acme"))])).0);
    assert_eq!(decide(&operator, "agents:delete", &protected), (false, vec!["protected-agents-admin-only".into()]));

    let viewer = who("viewer", Some("acme"), "k-view");
    let d = p.evaluate(&Request {
        principal: &viewer[..],
        action: "agents:read",
        resource: &acme_agent[..],
        context: NO_ATTRIBUTES,
    });
    assert!(d.allow);
    assert_eq!(d.obligations, [("mask", "labels.secret")]);
    assert!(!decide(&viewer, "agents:write", &acme_agent).0);

    let tenantless_viewer = who("viewer", None, "k-view");
    assert!(!decide(&tenantless_viewer, "agents:read", &globex_agent).0);

    let agent = who("agent", Some("acme"), "a-1");
    assert!(decide(&agent, "agents:heartbeat", &acme_agent).0);
    assert!(!decide(&agent, "agents:heartbeat", &protected).0, "another agent's record");
    assert!(!decide(&agent, "agents:delete", &acme_agent).0);
}
