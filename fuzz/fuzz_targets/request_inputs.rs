//! Every parser and validator that untrusted request input reaches before the store: agent
//! definitions, patches, heartbeat loads, API keys, tenant and agent ids, label selectors and
//! capability names. None may panic, whatever the bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nops_core::agent::{
    AgentId, AgentPatch, Load, NewAgent, parse_label_selector, validate_capability_name, validate_definition,
};
use nops_core::tenant::TenantId;

fuzz_target!(|data: &[u8]| {
    if let Ok(new) = serde_json::from_slice::<NewAgent>(data) {
        let _ = validate_definition(&new.name, new.endpoint.as_deref(), &new.labels, &new.capabilities);
    }
    if let Ok(patch) = serde_json::from_slice::<AgentPatch>(data) {
        let name = patch.name.unwrap_or_default();
        let endpoint = patch.endpoint.flatten();
        let _ = validate_definition(
            &name,
            endpoint.as_deref(),
            &patch.labels.unwrap_or_default(),
            &patch.capabilities.unwrap_or_default(),
        );
    }
    if let Ok(load) = serde_json::from_slice::<Load>(data) {
        let _ = load.validate();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = nops_core::auth::is_well_formed_api_key(text);
        let _ = text.parse::<TenantId>();
        let _ = text.parse::<AgentId>();
        let _ = parse_label_selector(text);
        let _ = validate_capability_name(text);
    }
});
