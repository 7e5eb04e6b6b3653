//! `nops`: the NOPS kernel's command-line interface.

mod keys_cli;
mod plugins_cli;
mod serve;
mod token_cli;

use clap::{Parser, Subcommand};

/// mimalloc: the kernel allocates many small, short-lived buffers per request; glibc's
/// allocator showed up at ~15% of heartbeat CPU in profiles, mimalloc at a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use nops::config::{Config, ServeArgs};

/// NOPS kernel: a control plane for fleets of edge agents, extended by sandboxed WebAssembly
/// plugins.
///
/// Start the kernel with `nops serve`. On the first start it creates a SQLite database under
/// ./.nops and prints a bootstrap admin API key once; use it as `Authorization: Bearer <key>`.
/// Settings come from flags, then NOPS_* environment variables, then ./nops.toml.
#[derive(Debug, Parser)]
#[command(name = "nops", version, about, long_about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the kernel: HTTP API, agent registry, heartbeat flusher and TTL sweeper
    Serve(ServeArgs),
    /// Inspect the configuration
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage plugins: upload, activate, roll back, shadow, delete, export chains, sign
    Plugins {
        #[command(flatten)]
        remote: plugins_cli::Remote,
        #[command(subcommand)]
        command: plugins_cli::PluginCommand,
    },
    /// Manage API keys: create, list, show, rotate with a grace period, revoke
    Keys {
        #[command(flatten)]
        remote: plugins_cli::Remote,
        #[command(subcommand)]
        command: keys_cli::KeyCommand,
    },
    /// Development tokens: mint an HS256 JWT for the development issuer
    #[command(subcommand)]
    Token(token_cli::TokenCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (flags > env > nops.toml > defaults) as TOML
    Show(ServeArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Fail points (`FAILPOINTS=outbox-after-publish=return`) let crash tests stop the kernel at
    // an exact point; with the variable unset nothing is configured and they do nothing.
    let _fail_points = fail::FailScenario::setup();
    let result = match cli.command {
        Command::Serve(args) => Config::resolve(&args).and_then(serve::run),
        Command::Config(ConfigCommand::Show(args)) => {
            Config::resolve(&args).and_then(|c| c.to_toml()).map(|text| print!("{text}"))
        }
        Command::Plugins { remote, command } => plugins_cli::run(remote, command),
        Command::Keys { remote, command } => keys_cli::run(remote, command),
        Command::Token(command) => token_cli::run(command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nops: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        // Catches clashing argument names (e.g. a positional `version` against `--version`),
        // which clap otherwise reports only when that subcommand is run.
        super::Cli::command().debug_assert();
    }
}
