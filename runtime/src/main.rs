//! The `caduceus` binary: command-line entry points of the Caduceus serving runtime.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = caduceus_runtime::cli::Cli::parse();
    match caduceus_runtime::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
