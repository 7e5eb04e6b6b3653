//! Hot-loading from `NOPS_PLUGINS_DIR`: a `<name>.toml` manifest beside its component (the
//! same stem with `.wasm`) and, if the manifest names one, its configuration document, is
//! uploaded (verified like any upload) and activated for the `default` tenant when it appears
//! or changes.
//!
//! The directory is scanned every [`SCAN_INTERVAL_MS`] rather than watched with inotify: a scan
//! works the same on every filesystem (network mounts, container volumes, where change
//! notifications are missing or unreliable), costs one `readdir` and a `stat` per file, and a
//! file half-written at one scan is read whole at the next (its size and time must be the same
//! in two scans in a row before it is loaded).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nops_core::CoreError;
use nops_core::plugin::Manifest;
use nops_core::plugin::service::PluginService;
use nops_core::tenant::TenantId;

/// How often the directory is scanned.
pub const SCAN_INTERVAL_MS: u64 = 500;
/// Most manifests one scan looks at.
pub const MANIFESTS_PER_SCAN_MAX: usize = 256;

/// What a manifest file looked like when last seen: length and modification time of the
/// manifest and its component.
type Fingerprint = (u64, Option<SystemTime>, u64, Option<SystemTime>);

/// Scans `dir` until the process ends.
pub async fn watch(dir: PathBuf, plugins: Arc<PluginService>) {
    if let Err(err) = std::fs::create_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %err, "cannot create the plugins directory");
    }
    let mut last_error: Option<String> = None;
    let mut seen: HashMap<PathBuf, Fingerprint> = HashMap::new();
    let mut settled: HashMap<PathBuf, Fingerprint> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(SCAN_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let manifests = match list_manifests(&dir) {
            Ok(m) => {
                last_error = None;
                m
            }
            Err(err) => {
                // Logged when it starts failing, not on every scan.
                if last_error.as_deref() != Some(&err.to_string()) {
                    tracing::warn!(dir = %dir.display(), error = %err, "cannot read the plugins directory");
                    last_error = Some(err.to_string());
                }
                continue;
            }
        };
        for path in manifests {
            let Some(print) = fingerprint(&path) else { continue };
            if settled.get(&path) == Some(&print) {
                continue;
            }
            // Load only once the files stopped changing between two scans.
            if seen.insert(path.clone(), print) != Some(print) {
                continue;
            }
            settled.insert(path.clone(), print);
            match load(&path, &plugins).await {
                Ok(Some(version)) => {
                    tracing::info!(manifest = %path.display(), %version, "plugin hot-loaded and activated")
                }
                Ok(None) => {}
                Err(err) => {
                    let transient = err.downcast_ref::<CoreError>().is_some_and(|e| {
                        matches!(e, CoreError::Store(_) | CoreError::Conflict { code: "concurrent_change", .. })
                    });
                    if transient {
                        // The store was unavailable or busy: try again at the next scan.
                        settled.remove(&path);
                        seen.remove(&path);
                        tracing::warn!(manifest = %path.display(), error = %err, "plugin not loaded yet; retrying");
                    } else {
                        tracing::error!(manifest = %path.display(), error = %err, "plugin in the plugins directory refused");
                    }
                }
            }
        }
    }
}

fn list_manifests(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
        .collect();
    manifests.sort();
    manifests.truncate(MANIFESTS_PER_SCAN_MAX);
    Ok(manifests)
}

fn fingerprint(manifest: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(manifest).ok()?;
    let w = std::fs::metadata(manifest.with_extension("wasm")).ok()?;
    Some((m.len(), m.modified().ok(), w.len(), w.modified().ok()))
}

/// Uploads and activates the plugin described by `manifest_path` unless that version is
/// already stored with the same digest. Returns the version activated.
async fn load(manifest_path: &Path, plugins: &PluginService) -> anyhow::Result<Option<semver::Version>> {
    let text = tokio::fs::read_to_string(manifest_path).await?;
    let manifest = Manifest::from_toml(&text)?;
    let wasm = tokio::fs::read(manifest_path.with_extension("wasm")).await?;
    let config = match &manifest.config {
        Some(file) => {
            let base = manifest_path.parent().unwrap_or(Path::new("."));
            let path = base.join(file);
            // The configuration must sit in the plugins directory, not anywhere a manifest points.
            if Path::new(file).components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                anyhow::bail!("config `{file}` must be a file name inside the plugins directory");
            }
            Some(tokio::fs::read(&path).await?)
        }
        None => None,
    };
    let tenant = TenantId::default_tenant();
    let (name, version) = (manifest.name.clone(), manifest.version.clone());
    match plugins.upload(&tenant, "plugins-dir", manifest.clone(), wasm, config).await {
        Ok(_) => {}
        Err(CoreError::Conflict { code: "version_exists", .. }) => {
            let view = plugins.show(&tenant, &name).await?;
            let stored = view.versions.iter().find(|v| v.version == version);
            if stored.is_none_or(|v| v.digest != manifest.digest) {
                anyhow::bail!("version {version} of `{name}` is stored with another digest; bump the version");
            }
            if view.state.active.as_ref() == Some(&version) {
                return Ok(None);
            }
        }
        Err(other) => return Err(other.into()),
    }
    plugins.activate(&tenant, &name, &version, "plugins-dir").await?;
    Ok(Some(version))
}
