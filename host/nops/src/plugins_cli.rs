//! `nops plugins …`: the plugin lifecycle from the command line. Commands that change a kernel
//! talk to its HTTP API; `prepare` and `keygen` work on local files only.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::{Args, Subcommand};
use nops_core::plugin::{Manifest, digest, public_key_base64, sign_manifest};
use rand::RngCore;

/// Where the kernel is and who is asking.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The kernel's base URL
    #[arg(long, env = "NOPS_URL", default_value = "http://127.0.0.1:7420", global = true)]
    url: String,
    /// API key (`Authorization: Bearer`)
    #[arg(long, env = "NOPS_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Tenant to act in (`X-Nops-Tenant`)
    #[arg(long, env = "NOPS_TENANT", global = true)]
    tenant: Option<String>,
}

impl Remote {
    /// A request to `path` under the kernel's URL, with the key and tenant headers.
    pub(crate) fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let mut builder = client.request(method, format!("{}{path}", self.url.trim_end_matches('/')));
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key);
        }
        if let Some(tenant) = &self.tenant {
            builder = builder.header("x-nops-tenant", tenant);
        }
        builder
    }

    /// Sends `builder` and prints the JSON answer, pretty; an error status is an error.
    pub(crate) async fn print_response(&self, builder: reqwest::RequestBuilder) -> anyhow::Result<()> {
        let response = builder.send().await.with_context(|| format!("calling {}", self.url))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let pretty = serde_json::from_str::<serde_json::Value>(&body)
            .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
            .unwrap_or(body);
        if !status.is_success() {
            bail!("{status}: {pretty}");
        }
        if !pretty.is_empty() {
            println!("{pretty}");
        }
        Ok(())
    }
}

/// Plugin commands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// List the tenant's plugins with their active and shadow versions
    List,
    /// Show a plugin: versions, digests, grants, limits, signer and call metrics
    Show { name: String },
    /// Upload a plugin: MANIFEST is `<name>.toml`; the component is the same path with `.wasm`
    Upload {
        manifest: PathBuf,
        /// Activate the version once stored
        #[arg(long)]
        activate: bool,
    },
    /// Activate a stored version
    Activate {
        name: String,
        #[arg(id = "plugin_version", value_name = "VERSION")]
        version: String,
    },
    /// Roll back to VERSION, or to the version active before the current one
    Rollback {
        name: String,
        #[arg(id = "plugin_version", value_name = "VERSION")]
        version: Option<String>,
    },
    /// Stop serving a plugin (its versions stay stored)
    Deactivate { name: String },
    /// Run VERSION in shadow beside the active version (`--stop` to end)
    Shadow {
        name: String,
        #[arg(id = "plugin_version", value_name = "VERSION")]
        version: Option<String>,
        #[arg(long, conflicts_with = "plugin_version")]
        stop: bool,
    },
    /// Show the recorded differences between the active and the shadow version
    Diffs {
        name: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Delete a stored version that is neither active nor shadowing
    Delete {
        name: String,
        #[arg(id = "plugin_version", value_name = "VERSION")]
        version: String,
    },
    /// Export a plugin's hash chain (JSON), for audit
    Chain { name: String },
    /// Call the active version with a JSON invocation, e.g. '{"authorize": {"action": "agents:read"}}'
    Invoke { name: String, invocation: String },
    /// Fill in the manifest's digests from its component and config, and sign it if a key is given
    Prepare {
        manifest: PathBuf,
        /// Key id recorded in the signature
        #[arg(long, requires = "secret_file")]
        key_id: Option<String>,
        /// File holding the base64 ed25519 secret key (from `nops plugins keygen`)
        #[arg(long, requires = "key_id")]
        secret_file: Option<PathBuf>,
    },
    /// Create an ed25519 signing key: the secret goes to FILE, the public key is printed
    Keygen { secret_file: PathBuf },
}

/// Runs a plugin command.
pub fn run(remote: Remote, command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Prepare { manifest, key_id, secret_file } => prepare(&manifest, key_id, secret_file),
        PluginCommand::Keygen { secret_file } => keygen(&secret_file),
        other => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(remote_command(&remote, other))
        }
    }
}

fn read_manifest(path: &Path) -> anyhow::Result<Manifest> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Manifest::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn config_path(manifest_path: &Path, manifest: &Manifest) -> Option<PathBuf> {
    manifest.config.as_ref().map(|file| manifest_path.parent().unwrap_or(Path::new(".")).join(file))
}

fn prepare(path: &Path, key_id: Option<String>, secret_file: Option<PathBuf>) -> anyhow::Result<()> {
    let mut manifest = read_manifest(path)?;
    let wasm_path = path.with_extension("wasm");
    let wasm = std::fs::read(&wasm_path).with_context(|| format!("reading {}", wasm_path.display()))?;
    manifest.digest = digest(&wasm);
    manifest.config_digest = match config_path(path, &manifest) {
        Some(config) => Some(digest(&std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?)),
        None => None,
    };
    manifest.signature = None;
    if let (Some(key_id), Some(secret_file)) = (key_id, secret_file) {
        let text =
            std::fs::read_to_string(&secret_file).with_context(|| format!("reading {}", secret_file.display()))?;
        let secret: [u8; 32] = BASE64
            .decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .context("the secret file must hold a base64 32-byte ed25519 secret key")?;
        sign_manifest(&mut manifest, &key_id, &secret);
    }
    std::fs::write(path, manifest.to_toml()).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", manifest.to_toml());
    Ok(())
}

fn keygen(secret_file: &Path) -> anyhow::Result<()> {
    if secret_file.exists() {
        bail!("{} exists; refusing to overwrite a key", secret_file.display());
    }
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    write_secret(secret_file, &BASE64.encode(secret))?;
    println!(
        "public key (add to [plugins.trusted_keys] of the kernels that should trust it):\n{}",
        public_key_base64(&secret)
    );
    Ok(())
}

#[cfg(unix)]
fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{text}")?;
    Ok(())
}

#[cfg(not(unix))]
fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, format!("{text}\n")).with_context(|| format!("creating {}", path.display()))
}

async fn remote_command(remote: &Remote, command: PluginCommand) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let request =
        |method: reqwest::Method, path: &str| remote.request(&client, method, &format!("/api/v1/plugins{path}"));
    use reqwest::Method;
    let builder = match command {
        PluginCommand::List => request(Method::GET, ""),
        PluginCommand::Show { name } => request(Method::GET, &format!("/{name}")),
        PluginCommand::Upload { manifest: path, activate } => {
            let manifest = read_manifest(&path)?;
            let text = std::fs::read_to_string(&path)?;
            let wasm_path = path.with_extension("wasm");
            let wasm = std::fs::read(&wasm_path).with_context(|| format!("reading {}", wasm_path.display()))?;
            let mut form = reqwest::multipart::Form::new()
                .text("manifest", text)
                .part("wasm", reqwest::multipart::Part::bytes(wasm).file_name("plugin.wasm"));
            if let Some(config) = config_path(&path, &manifest) {
                let bytes = std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?;
                form = form.part("config", reqwest::multipart::Part::bytes(bytes).file_name("config"));
            }
            request(Method::POST, if activate { "?activate=true" } else { "" }).multipart(form)
        }
        PluginCommand::Activate { name, version } => {
            request(Method::POST, &format!("/{name}/activate")).json(&serde_json::json!({ "version": version }))
        }
        PluginCommand::Rollback { name, version } => {
            request(Method::POST, &format!("/{name}/rollback")).json(&serde_json::json!({ "version": version }))
        }
        PluginCommand::Deactivate { name } => request(Method::POST, &format!("/{name}/deactivate")),
        PluginCommand::Shadow { name, stop: true, .. } => request(Method::DELETE, &format!("/{name}/shadow")),
        PluginCommand::Shadow { name, version, .. } => {
            let version = version.context("give a VERSION, or --stop")?;
            request(Method::PUT, &format!("/{name}/shadow")).json(&serde_json::json!({ "version": version }))
        }
        PluginCommand::Diffs { name, limit } => request(Method::GET, &format!("/{name}/shadow?limit={limit}")),
        PluginCommand::Delete { name, version } => request(Method::DELETE, &format!("/{name}/versions/{version}")),
        PluginCommand::Chain { name } => request(Method::GET, &format!("/{name}/chain")),
        PluginCommand::Invoke { name, invocation } => {
            let body: serde_json::Value = serde_json::from_str(&invocation).context("the invocation is not JSON")?;
            request(Method::POST, &format!("/{name}/invoke")).json(&body)
        }
        PluginCommand::Prepare { .. } | PluginCommand::Keygen { .. } => unreachable!("handled locally"),
    };
    remote.print_response(builder).await
}
