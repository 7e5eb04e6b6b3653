#!/usr/bin/env python3
"""Writes bench-100-rules.json: a 100-rule ABAC document for benchmarks.

The document is generated, but shaped like a real multi-team policy: a tenant-isolation
forbid, a score of guard rails (off-hours changes, risk scores, quarantined or protected
resources, suspended principals, missing MFA) and permits per role, resource kind and
action, scoped by team, environment, region or label, some with obligations.

The output is deterministic (fixed seed, sorted choices), so re-running this script
reproduces the committed file byte for byte:

    python3 policies/generate-bench.py > policies/bench-100-rules.json
"""

import json
import random

RULES = 100
rng = random.Random(100)

KINDS = ["agents", "plugins", "keys", "tasks", "events", "contracts", "tools", "policies", "metrics", "tenants"]
VERBS = ["read", "list", "write", "delete", "execute", "approve"]
ROLES = ["operator", "viewer", "agent", "auditor", "billing", "deployer", "sre", "support", "developer", "analyst"]
TEAMS = ["payments", "search", "edge", "ml", "platform", "identity", "storage", "video"]
ENVS = ["dev", "staging", "prod", "sandbox"]
REGIONS = ["eu-", "us-", "ap-", "sa-"]


def cond(attr, op, **operand):
    return {"attr": attr, "op": op, **operand}


def forbids():
    """The guard rails, in the order a policy team would write them."""
    out = [
        {"id": "f-tenant-isolation", "effect": "forbid", "actions": ["*"],
         "when": [cond("principal.tenant", "ne", ref="resource.tenant")]},
        {"id": "f-tenantless-non-admin", "effect": "forbid", "actions": ["*"],
         "when": [cond("principal.tenant", "absent"), cond("principal.role", "ne", value="admin")]},
        {"id": "f-suspended-principal", "effect": "forbid", "actions": ["*"],
         "when": [cond("principal.suspended", "eq", value=True)]},
        {"id": "f-keys-need-mfa", "effect": "forbid", "actions": ["keys:*"],
         "when": [cond("principal.mfa", "ne", value=True), cond("principal.role", "ne", value="admin")]},
        {"id": "f-high-risk-writes", "effect": "forbid", "actions": ["*"],
         "when": [cond("context.risk_score", "gt", value=0.8), cond("principal.role", "ne", value="admin")]},
        {"id": "f-quarantined-resources", "effect": "forbid", "actions": ["agents:write", "tasks:execute", "tools:execute"],
         "when": [cond("resource.labels", "contains", value="quarantine=true")]},
        {"id": "f-delete-busy-agents", "effect": "forbid", "actions": ["agents:delete"],
         "when": [cond("resource.in_flight", "gt", value=0)]},
        {"id": "f-untrusted-network", "effect": "forbid", "actions": ["keys:*", "policies:write", "plugins:write"],
         "when": [cond("context.network", "prefix", value="public:")]},
    ]
    # Off-hours change freezes, per kind: before 6:00 and from 22:00.
    for kind in ["agents", "plugins", "contracts", "policies", "tenants"]:
        out.append({"id": f"f-{kind}-night-freeze-early", "effect": "forbid", "actions": [f"{kind}:write", f"{kind}:delete"],
                    "when": [cond("context.hour", "lt", value=6), cond("principal.role", "in", value=["operator", "deployer", "developer"])]})
        out.append({"id": f"f-{kind}-night-freeze-late", "effect": "forbid", "actions": [f"{kind}:write", f"{kind}:delete"],
                    "when": [cond("context.hour", "ge", value=22), cond("principal.role", "in", value=["operator", "deployer", "developer"])]})
    # Production changes need a ticket, per team.
    for team in TEAMS[:4]:
        out.append({"id": f"f-{team}-prod-needs-ticket", "effect": "forbid", "actions": ["agents:write", "tasks:execute", "plugins:write"],
                    "when": [cond("resource.team", "eq", value=team), cond("resource.env", "eq", value="prod"),
                             cond("context.ticket", "absent")]})
    out.append({"id": "f-protected-labels", "effect": "forbid", "actions": ["agents:delete", "contracts:delete", "tenants:delete"],
                "when": [cond("resource.labels", "contains", value="protected=true"), cond("principal.role", "ne", value="admin")]})
    out.append({"id": "f-over-budget", "effect": "forbid", "actions": ["tasks:execute", "tools:execute"],
                "when": [cond("context.spend", "ge", ref="resource.budget")]})
    return out


def permits(count):
    out = [{"id": "p-admins-everything", "effect": "permit", "actions": ["*"],
            "when": [cond("principal.role", "eq", value="admin")]}]
    seen = set()
    while len(out) < count:
        role = rng.choice(ROLES)
        kind = rng.choice(KINDS)
        verbs = sorted(rng.sample(VERBS, rng.randint(1, 3)))
        key = (role, kind, tuple(verbs))
        if key in seen:
            continue
        seen.add(key)
        actions = [f"{kind}:*"] if len(verbs) == 3 and rng.random() < 0.4 else [f"{kind}:{v}" for v in verbs]
        when = [cond("principal.role", "eq", value=role)]
        scope = rng.choice(["team", "env", "region", "label", "hours", "owner", "none"])
        if scope == "team":
            when.append(cond("principal.team", "eq", ref="resource.team"))
        elif scope == "env":
            when.append(cond("resource.env", "in", value=sorted(rng.sample(ENVS, rng.randint(1, 3)))))
        elif scope == "region":
            when.append(cond("resource.region", "prefix", value=rng.choice(REGIONS)))
        elif scope == "label":
            when.append(cond("resource.labels", "contains", value=f"team={rng.choice(TEAMS)}"))
        elif scope == "hours":
            start = rng.randint(6, 10)
            when.append(cond("context.hour", "ge", value=start))
            when.append(cond("context.hour", "lt", value=start + rng.randint(8, 10)))
        elif scope == "owner":
            when.append(cond("resource.owner", "eq", ref="principal.subject"))
        if rng.random() < 0.2:
            when.append(cond("principal.level", "ge", value=rng.randint(1, 4)))
        rule = {"id": f"p-{len(out):03}-{role}-{kind}-{'-'.join(verbs)}", "effect": "permit", "actions": actions, "when": when}
        if "read" in verbs or "list" in verbs:
            if rng.random() < 0.3:
                rule["obligations"] = [["mask", rng.choice(["labels.secret", "endpoint", "params.token"])]]
        if rng.random() < 0.1:
            rule.setdefault("obligations", []).append(["audit", "always"])
        out.append(rule)
    return out


def main():
    guard_rails = forbids()
    rules = guard_rails + permits(RULES - len(guard_rails))
    assert len(rules) == RULES
    # One rule per line: diffable, and readable enough to review.
    description = "Generated by policies/generate-bench.py for benchmarks: 100 rules, forbids first."
    lines = [json.dumps(rule) for rule in rules]
    print('{ "version": 1,\n  "description": %s,\n  "rules": [\n    %s\n  ]\n}' % (json.dumps(description), ",\n    ".join(lines)))


if __name__ == "__main__":
    main()
