//! `caduceus config check FILE` and `caduceus config print`: the server's own loader, run
//! without starting anything, so a deploy can be validated in CI or before a rollout.

use std::path::PathBuf;

use clap::Subcommand;

use crate::config::{CaduceusConfig, ConfigOverrides};

/// `caduceus config ...`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

/// Config subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file (with the CADUCEUS_* environment applied, as `serve` would).
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Print the effective configuration as TOML, API keys masked.
    Print {
        #[command(flatten)]
        overrides: ConfigOverrides,
    },
}

/// Runs a config subcommand; an invalid config is an error (non-zero exit).
pub fn run(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Check { file } => {
            let overrides = ConfigOverrides {
                config: Some(file.clone()),
                ..ConfigOverrides::default()
            };
            let config = CaduceusConfig::load_from_process_env(&overrides)?;
            println!(
                "ok: {} is valid (model `{}` from {}, listening on {}:{})",
                file.display(),
                config.model.served_name(),
                config.model.path.display(),
                config.server.host,
                config.server.port
            );
        }
        ConfigCommand::Print { overrides } => {
            let config = CaduceusConfig::load_from_process_env(&overrides)?;
            println!("{}", config.to_toml_masked()?.trim_end());
        }
    }
    Ok(())
}
