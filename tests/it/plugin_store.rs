//! The plugin store on every backend: blobs, versions, states, the hash chain, the change
//! counter and shadow differences.

use nops_core::plugin::{
    ChainAction, ChainEntry, Manifest, PluginChange, PluginKind, PluginState, PluginVersion, ShadowDiff, digest,
    sign_manifest, verify_chain,
};
use nops_core::store::{PluginStore, StoreError};
use nops_core::tenant::TenantId;
use nops_store::SqlStore;
use serde_json::json;

use crate::support::{T0_MS, TestKernel, backends};

const ACTOR: &str = "admin";

fn tenant(name: &str) -> TenantId {
    name.parse().expect("tenant")
}

fn manifest(name: &str, version: &str) -> Manifest {
    Manifest::from_toml(&format!(
        "name = \"{name}\"\nversion = \"{version}\"\nkind = \"policy\"\ndigest = \"{}\"\n\
         [grants]\nstorage = true\nbus = [\"plugins.{name}.>\"]\n[limits]\ndeadline_ms = 20\n",
        digest(format!("{name}@{version}").as_bytes())
    ))
    .expect("manifest")
}

/// One plugin's history as the plugin service would write it: each change links to the last.
struct Plugin {
    tenant: TenantId,
    name: String,
    last: Option<ChainEntry>,
    state: Option<PluginState>,
}

impl Plugin {
    fn new(tenant: &TenantId, name: &str) -> Self {
        Self { tenant: tenant.clone(), name: name.to_string(), last: None, state: None }
    }

    /// The next change: its chain entry, and the state it leaves (unchanged by uploads and
    /// deletions of inactive versions).
    fn change(&self, action: ChainAction, m: &Manifest, at_ms: i64) -> PluginChange {
        let entry = ChainEntry::next(self.last.as_ref(), &self.tenant, &self.name, action, m, at_ms, ACTOR);
        let mut state = self.state.clone().unwrap_or(PluginState {
            tenant: self.tenant.clone(),
            name: self.name.clone(),
            kind: m.kind,
            active: None,
            shadow: None,
            updated_at_ms: at_ms,
        });
        state.updated_at_ms = at_ms;
        let (mut insert, mut delete) = (None, None);
        match action {
            ChainAction::Upload => {
                insert = Some(PluginVersion {
                    tenant: self.tenant.clone(),
                    manifest: m.clone(),
                    signed_by: m.signature.as_ref().map(|s| s.key_id.clone()),
                    uploaded_at_ms: at_ms,
                    uploaded_by: ACTOR.into(),
                });
            }
            ChainAction::Activate | ChainAction::Rollback => {
                state.active = Some(m.version.clone());
                if state.shadow.as_ref() == Some(&m.version) {
                    state.shadow = None;
                }
            }
            ChainAction::ShadowStart => state.shadow = Some(m.version.clone()),
            ChainAction::ShadowStop => state.shadow = None,
            ChainAction::Deactivate => state.active = None,
            ChainAction::Delete => delete = Some(m.version.clone()),
        }
        PluginChange { entry, insert, state: Some(state), delete }
    }

    /// Applies the next change and remembers it.
    async fn apply(&mut self, store: &SqlStore, action: ChainAction, m: &Manifest, at_ms: i64) {
        let change = self.change(action, m, at_ms);
        store.apply_plugin_change(&change).await.unwrap_or_else(|e| panic!("{action:?} {}: {e}", m.version));
        self.last = Some(change.entry);
        self.state = change.state;
    }

    async fn verify(&self, store: &SqlStore) {
        let chain = store.plugin_chain(&self.tenant, &self.name).await.expect("chain");
        let versions = store.list_plugin_versions(&self.tenant, &self.name).await.expect("versions");
        let state = store.get_plugin_state(&self.tenant, &self.name).await.expect("state");
        assert_eq!(state, self.state, "the stored state is the one applied");
        assert_eq!(chain.last(), self.last.as_ref(), "the stored chain ends with the last entry applied");
        verify_chain(&chain, &versions, state.as_ref()).expect("the stored chain verifies");
    }
}

fn version_strings(versions: &[PluginVersion]) -> Vec<String> {
    versions.iter().map(|v| v.manifest.version.to_string()).collect()
}

#[tokio::test]
async fn blobs_round_trip_and_a_second_put_is_a_no_op() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let store = &k.kernel.store;
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
        let key = digest(&bytes);
        assert_eq!(store.get_plugin_blob(&key).await.expect("get"), None, "{backend:?}");
        store.put_plugin_blob(&key, &bytes).await.expect("put");
        store.put_plugin_blob(&key, &bytes).await.expect("putting the same blob again succeeds");
        store.put_plugin_blob(&key, b"other bytes").await.expect("a put under a stored digest is a no-op");
        assert_eq!(store.get_plugin_blob(&key).await.expect("get").as_deref(), Some(&bytes[..]), "{backend:?}");
        store.put_plugin_blob("blake2b256:empty", b"").await.expect("empty blob");
        assert_eq!(store.get_plugin_blob("blake2b256:empty").await.expect("get"), Some(Vec::new()), "{backend:?}");
    }
}

#[tokio::test]
async fn a_sequence_of_changes_builds_a_chain_that_verifies() {
    let secret = [9u8; 32];
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let store = &k.kernel.store;
        let acme = tenant("acme");
        let mut p = Plugin::new(&acme, "abac");
        let v1 = manifest("abac", "1.0.0");
        let mut v2 = manifest("abac", "1.1.0-rc.1+build.7");
        v2.config = Some("abac.json".into());
        v2.config_digest = Some(digest(b"{}"));
        sign_manifest(&mut v2, "release", &secret);

        let mut generation = store.plugin_generation().await.expect("generation");
        let steps = [
            (ChainAction::Upload, &v1),
            (ChainAction::Activate, &v1),
            (ChainAction::Upload, &v2),
            (ChainAction::ShadowStart, &v2),
            (ChainAction::Activate, &v2),
            (ChainAction::Rollback, &v1),
            (ChainAction::Deactivate, &v1),
        ];
        for (i, (action, m)) in steps.into_iter().enumerate() {
            p.apply(store, action, m, T0_MS + i as i64).await;
            let now = store.plugin_generation().await.expect("generation");
            assert_eq!(now, generation + 1, "{backend:?}: each change advances the generation by one");
            generation = now;
            p.verify(store).await;
        }

        let chain = store.plugin_chain(&acme, "abac").await.expect("chain");
        assert_eq!(chain.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6, 7], "{backend:?}");
        assert_eq!(chain.iter().map(|e| e.action).collect::<Vec<_>>(), steps.map(|(a, _)| a), "{backend:?}");
        let versions = store.list_plugin_versions(&acme, "abac").await.expect("versions");
        assert_eq!(versions.len(), 2, "{backend:?}");
        assert_eq!(versions[0].manifest, v1, "{backend:?}: the manifest round-trips");
        assert_eq!(versions[1].manifest, v2, "{backend:?}: signature, config and build metadata round-trip");
        assert_eq!(versions[1].signed_by.as_deref(), Some("release"));
        assert_eq!(versions[1].uploaded_at_ms, T0_MS + 2);
        assert_eq!(versions[1].uploaded_by, ACTOR);
        assert_eq!(store.list_plugin_chains().await.expect("chains"), [(acme.clone(), "abac".to_string())]);

        // A changed stored manifest is caught by the chain.
        let mut tampered = versions.clone();
        tampered[0].manifest.grants.clock = true;
        let state = store.get_plugin_state(&acme, "abac").await.expect("state");
        assert!(verify_chain(&chain, &tampered, state.as_ref()).is_err(), "{backend:?}");
    }
}

#[tokio::test]
async fn a_change_whose_seq_is_taken_is_refused_and_changes_nothing() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let store = &k.kernel.store;
        let acme = tenant("acme");
        let mut p = Plugin::new(&acme, "abac");
        let v1 = manifest("abac", "1.0.0");
        p.apply(store, ChainAction::Upload, &v1, T0_MS).await;
        let generation = store.plugin_generation().await.expect("generation");

        // A concurrent writer that also saw an empty chain: its entry also has seq 1.
        let rival = Plugin::new(&acme, "abac");
        let v2 = manifest("abac", "2.0.0");
        let mut change = rival.change(ChainAction::Upload, &v2, T0_MS + 1);
        change.state.as_mut().expect("state").active = Some(v2.version.clone());
        let err = store.apply_plugin_change(&change).await.expect_err("seq 1 is taken");
        assert!(matches!(err, StoreError::UniqueViolation(_)), "{backend:?}: {err:?}");

        assert_eq!(store.plugin_generation().await.expect("generation"), generation, "{backend:?}");
        assert_eq!(version_strings(&store.list_plugin_versions(&acme, "abac").await.expect("versions")), ["1.0.0"]);
        assert_eq!(store.plugin_chain(&acme, "abac").await.expect("chain").len(), 1, "{backend:?}");
        p.verify(store).await;

        // The writer that lost retries after the winner's entry.
        p.apply(store, ChainAction::Upload, &v2, T0_MS + 2).await;
        p.verify(store).await;
    }
}

#[tokio::test]
async fn a_duplicate_version_is_refused_with_its_chain_entry() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let store = &k.kernel.store;
        let acme = tenant("acme");
        let mut p = Plugin::new(&acme, "abac");
        let v1 = manifest("abac", "1.0.0");
        p.apply(store, ChainAction::Upload, &v1, T0_MS).await;
        let generation = store.plugin_generation().await.expect("generation");

        let mut again = v1.clone();
        again.grants.identity = true;
        let change = p.change(ChainAction::Upload, &again, T0_MS + 1);
        let err = store.apply_plugin_change(&change).await.expect_err("1.0.0 exists");
        assert!(matches!(err, StoreError::UniqueViolation(_)), "{backend:?}: {err:?}");

        assert_eq!(store.plugin_generation().await.expect("generation"), generation, "{backend:?}");
        assert_eq!(store.plugin_chain(&acme, "abac").await.expect("chain").len(), 1, "the entry was rolled back");
        let versions = store.list_plugin_versions(&acme, "abac").await.expect("versions");
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0].manifest, v1, "{backend:?}: the stored version is untouched");
        p.verify(store).await;

        // Seq 2 is still free.
        p.apply(store, ChainAction::Activate, &v1, T0_MS + 2).await;
        p.verify(store).await;
    }
}

#[tokio::test]
async fn versions_list_oldest_first_not_by_version() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let store = &k.kernel.store;
        let acme = tenant("acme");
        let mut p = Plugin::new(&acme, "abac");
        // Upload times, with a tie broken by insertion order; neither string nor semver order.
        for (version, at_ms) in [("9.0.0", 1), ("10.0.0", 2), ("1.0.0", 3), ("0.5.0", 3), ("2.0.0", 4)] {
            p.apply(store, ChainAction::Upload, &manifest("abac", version), T0_MS + at_ms).await;
        }
        let versions = store.list_plugin_versions(&acme, "abac").await.expect("versions");
        assert_eq!(version_strings(&versions), ["9.0.0", "10.0.0", "1.0.0", "0.5.0", "2.0.0"], "{backend:?}");
        p.verify(store).await;
    }
}

#[tokio::test]
async fn deleting_a_version_removes_it_and_keeps_its_blob() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let store = &k.kernel.store;
        let acme = tenant("acme");
        let mut p = Plugin::new(&acme, "abac");
        let (v1, v2) = (manifest("abac", "1.0.0"), manifest("abac", "1.1.0"));
        store.put_plugin_blob(&v1.digest, b"component 1").await.expect("blob");
        p.apply(store, ChainAction::Upload, &v1, T0_MS).await;
        p.apply(store, ChainAction::Upload, &v2, T0_MS + 1).await;
        p.apply(store, ChainAction::Activate, &v2, T0_MS + 2).await;
        let generation = store.plugin_generation().await.expect("generation");

        p.apply(store, ChainAction::Delete, &v1, T0_MS + 3).await;
        assert_eq!(version_strings(&store.list_plugin_versions(&acme, "abac").await.expect("versions")), ["1.1.0"]);
        assert_eq!(store.plugin_generation().await.expect("generation"), generation + 1, "{backend:?}");
        assert_eq!(store.get_plugin_blob(&v1.digest).await.expect("blob").as_deref(), Some(&b"component 1"[..]));
        p.verify(store).await;

        // The version can be uploaded again once deleted.
        p.apply(store, ChainAction::Upload, &v1, T0_MS + 4).await;
        assert_eq!(
            version_strings(&store.list_plugin_versions(&acme, "abac").await.expect("versions")),
            ["1.1.0", "1.0.0"],
            "{backend:?}"
        );
        p.verify(store).await;
    }
}

fn diff(tenant: &TenantId, name: &str, at_ms: i64) -> ShadowDiff {
    ShadowDiff {
        tenant: tenant.clone(),
        name: name.to_string(),
        active: "1.0.0".parse().expect("version"),
        shadow: "1.1.0-beta.2".parse().expect("version"),
        input: json!({"subject": "user\u{0}1", "n": at_ms, "ratio": 0.1, "neg": -7, "big": u64::MAX, "list": [1.5e300, null]}),
        active_output: json!({"allow": true}),
        shadow_output: json!({"allow": false, "reason": "é ✓"}),
        at_ms,
    }
}

#[tokio::test]
async fn shadow_diffs_are_bounded_per_plugin_and_list_newest_first() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let store = &k.kernel.store;
        let (acme, other) = (tenant("acme"), tenant("other"));
        for at_ms in 1..=5 {
            store.insert_shadow_diff(&diff(&acme, "abac", at_ms), 3).await.expect("insert");
        }
        for at_ms in 1..=2 {
            store.insert_shadow_diff(&diff(&acme, "rbac", at_ms), 3).await.expect("insert");
            store.insert_shadow_diff(&diff(&other, "abac", at_ms), 3).await.expect("insert");
        }

        let listed = store.list_shadow_diffs(&acme, "abac", 10).await.expect("list");
        assert_eq!(listed.iter().map(|d| d.at_ms).collect::<Vec<_>>(), [5, 4, 3], "{backend:?}");
        assert_eq!(listed[0], diff(&acme, "abac", 5), "{backend:?}: a difference round-trips exactly");
        let limited = store.list_shadow_diffs(&acme, "abac", 2).await.expect("list");
        assert_eq!(limited.iter().map(|d| d.at_ms).collect::<Vec<_>>(), [5, 4], "{backend:?}");
        let rbac = store.list_shadow_diffs(&acme, "rbac", 10).await.expect("list");
        assert_eq!(rbac.iter().map(|d| d.at_ms).collect::<Vec<_>>(), [2, 1], "{backend:?}: other plugins are apart");
        assert_eq!(store.list_shadow_diffs(&other, "abac", 10).await.expect("list").len(), 2, "{backend:?}");

        // A lower bound trims the older rows on the next insert.
        store.insert_shadow_diff(&diff(&acme, "abac", 6), 1).await.expect("insert");
        let listed = store.list_shadow_diffs(&acme, "abac", 10).await.expect("list");
        assert_eq!(listed.iter().map(|d| d.at_ms).collect::<Vec<_>>(), [6], "{backend:?}");
    }
}

#[tokio::test]
async fn one_tenant_does_not_see_another_tenants_plugins() {
    for backend in backends() {
        let k = TestKernel::start(backend).await;
        let store = &k.kernel.store;
        let (acme, other) = (tenant("acme"), tenant("other"));
        let v1 = manifest("abac", "1.0.0");
        let mut a = Plugin::new(&acme, "abac");
        a.apply(store, ChainAction::Upload, &v1, T0_MS).await;
        a.apply(store, ChainAction::Activate, &v1, T0_MS + 1).await;

        assert_eq!(store.get_plugin_state(&other, "abac").await.expect("state"), None, "{backend:?}");
        assert!(store.list_plugin_states(Some(&other)).await.expect("states").is_empty(), "{backend:?}");
        assert!(store.list_plugin_versions(&other, "abac").await.expect("versions").is_empty(), "{backend:?}");
        assert!(store.plugin_chain(&other, "abac").await.expect("chain").is_empty(), "{backend:?}");

        // The same name and seq in another tenant is another plugin.
        let mut b = Plugin::new(&other, "abac");
        b.apply(store, ChainAction::Upload, &v1, T0_MS + 2).await;
        let acme_states = store.list_plugin_states(Some(&acme)).await.expect("states");
        assert_eq!(acme_states.len(), 1);
        assert_eq!(acme_states[0].active, Some(v1.version.clone()), "{backend:?}");
        assert_eq!(acme_states[0].kind, PluginKind::Policy);
        let other_states = store.list_plugin_states(Some(&other)).await.expect("states");
        assert_eq!(other_states.len(), 1);
        assert_eq!(other_states[0].active, None, "{backend:?}: the other tenant's upload activated nothing");
        let all = store.list_plugin_states(None).await.expect("states");
        assert_eq!(all.iter().map(|s| s.tenant.as_str()).collect::<Vec<_>>(), ["acme", "other"], "{backend:?}");
        assert_eq!(
            store.list_plugin_chains().await.expect("chains"),
            [(acme.clone(), "abac".to_string()), (other.clone(), "abac".to_string())],
            "{backend:?}"
        );
        a.verify(store).await;
        b.verify(store).await;
    }
}
