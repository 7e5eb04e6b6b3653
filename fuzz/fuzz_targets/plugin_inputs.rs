//! What a plugin upload and a plugin call reach before the runtime: manifests (TOML), their
//! checks against the component and the operator's ceilings, signature verification, plugin
//! names, versions, subjects and invocations (JSON). None may panic, whatever the bytes.

#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nops_core::plugin::call::Invocation;
use nops_core::plugin::{Ceilings, Manifest, TrustPolicy, subject_matches, validate_plugin_name, validate_subject};

fn trust() -> &'static TrustPolicy {
    static TRUST: OnceLock<TrustPolicy> = OnceLock::new();
    TRUST.get_or_init(|| {
        let keys = BTreeMap::from([("release".to_string(), nops_core::plugin::public_key_base64(&[9u8; 32]))]);
        TrustPolicy::from_base64(true, &keys).expect("a valid key")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        let _ = serde_json::from_slice::<Invocation>(data);
        return;
    };
    if let Ok(manifest) = Manifest::from_toml(text) {
        let _ = manifest.check(data, Some(data), &Ceilings::default());
        let _ = manifest.check(data, None, &Ceilings::default());
        let _ = trust().verify(&manifest);
        let _ = manifest.signing_bytes();
        let _ = Manifest::from_toml(&manifest.to_toml());
    }
    let _ = serde_json::from_str::<Invocation>(text);
    let _ = validate_plugin_name(text);
    let _ = text.parse::<semver::Version>();
    let _ = validate_subject(text, true);
    if let Some((pattern, subject)) = text.split_once(' ') {
        let _ = subject_matches(pattern, subject);
    }
});
