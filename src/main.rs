//! The `kvstore` binary: parse the command, nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kvstore::{app, config::Config, import, logging, metrics::Metrics, store::Store};

/// `kvstore --version` prints "kvstore <version> (<revision>)".
const LONG_VERSION: &str = concat!(
    env!("KVSTORE_BUILD_VERSION"),
    " (",
    env!("KVSTORE_BUILD_REVISION"),
    ")"
);

/// Key/value REST service over MySQL with an in-memory read-through cache.
///
/// Configured by KV_* environment variables only (see README.md "Configuration");
/// KV_DATABASE_URL is required.
#[derive(Parser)]
#[command(name = "kvstore", version = LONG_VERSION, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default when no command is given).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Load a JSON dataset (an array of objects of key -> value, or one object) and exit.
    Import {
        /// Path of the JSON file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvstore: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kvstore")
        .build()
        .expect("tokio runtime");
    let (log, access, guard) = logging::init(config.log_level);
    let code = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => match app::run_until_signal(config, log.clone(), access).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    slog::error!(log, "cannot start"; "error" => e.to_string());
                    ExitCode::FAILURE
                }
            },
            Command::Migrate => {
                let store = Store::new(
                    &config,
                    std::sync::Arc::new(Metrics::new(app::VERSION, app::REVISION)),
                );
                let r = store.migrate().await;
                store.close(std::time::Duration::from_secs(5)).await;
                match r {
                    Ok(applied) => {
                        slog::info!(log, "migrations applied"; "applied" => format!("{applied:?}"));
                        println!("migrations up to date (applied now: {applied:?})");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("kvstore: migrate failed: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Import { file } => {
                let text = match std::fs::read_to_string(&file) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("kvstore: cannot read {}: {e}", file.display());
                        return ExitCode::FAILURE;
                    }
                };
                let pairs = match import::parse(&text) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("kvstore: {}: {e}", file.display());
                        return ExitCode::FAILURE;
                    }
                };
                let store = Store::new(
                    &config,
                    std::sync::Arc::new(Metrics::new(app::VERSION, app::REVISION)),
                );
                let r = match store.migrate().await {
                    Ok(_) => import::run(&store, &pairs, config.max_value_bytes).await,
                    Err(e) => Err(format!("migrations failed: {e}")),
                };
                store.close(std::time::Duration::from_secs(5)).await;
                match r {
                    Ok(n) => {
                        println!("imported {n} keys from {}", file.display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("kvstore: import failed: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
    });
    drop(runtime);
    // The last logger first: the writer thread ends once it has written every queued line.
    drop(log);
    drop(guard);
    code
}
