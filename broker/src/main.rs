//! `ringmq-broker`: runs one broker node.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ringmq_broker::Config;

/// Runs one ringmq broker node. Without --config it uses the embedded
/// defaults: MQTT/TCP on 1883, MQTT over WebSocket on 8083 (/mqtt), admin
/// HTTP on 8080, the store in ./data. Log level: RUST_LOG (default
/// warn,ringmq_broker=info).
#[derive(Parser)]
#[command(name = "ringmq-broker", version)]
struct Cli {
    /// YAML configuration; every key optional (see --print-default-config).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Prints the defaults, a comment on every key, and exits.
    #[arg(long)]
    print_default_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Reads a password on stdin, prints its argon2id hash (for the
    /// credentials file).
    HashPassword,
}

// The message path allocates per message (the message, its deliveries) on
// several worker threads at once. jemalloc carried 18 % more QoS 1 messages
// than glibc's allocator in benchmark scenario 4, steadier QoS 0 latency in
// scenario 1, and 3 % more memory per idle connection; mimalloc gained less
// and doubled the idle memory (docs/benchmarks.md, session 4).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Broker events at info, the libraries underneath only when they warn.
const DEFAULT_LOG: &str = "warn,ringmq_broker=info";

/// Exit code for a bad command line or configuration (EX_USAGE).
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match parse_args() {
        Ok(Some(c)) => c,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmq-broker: {e:#}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let shutdown = match shutdown_signal() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringmq-broker: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let system = ntex::rt::System::new("ringmq-broker", ntex::rt::DefaultRuntime);
    match system.block_on(serve(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmq-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the command line; `None` means the request was answered already.
fn parse_args() -> anyhow::Result<Option<Config>> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are answers, not errors.
        Err(e) if !e.use_stderr() => {
            print!("{e}");
            return Ok(None);
        }
        Err(e) => anyhow::bail!("{e}"),
    };
    if let Some(Command::HashPassword) = cli.command {
        let mut password = String::new();
        std::io::stdin()
            .read_line(&mut password)
            .context("reading the password from stdin")?;
        let password = password.trim_end_matches(['\r', '\n']);
        anyhow::ensure!(!password.is_empty(), "empty password");
        let hash = ringmq_broker::auth::hash_password(password)
            .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
        println!("{hash}");
        return Ok(None);
    }
    if cli.print_default_config {
        print!("{}", Config::default_yaml());
        return Ok(None);
    }
    match cli.config {
        Some(path) => Ok(Some(Config::from_file(&path)?)),
        None => Ok(Some(Config::default())),
    }
}

async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    ringmq_broker::run(config, shutdown).await?;
    Ok(())
}

/// A future that resolves on the first SIGTERM, SIGINT or SIGQUIT. The
/// signals are read on a thread of their own, so the runtime needs no part in it.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGQUIT])?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "shutdown signal received");
                let _ = tx.send(());
            }
        })?;
    Ok(async move {
        let _ = rx.await;
    })
}
