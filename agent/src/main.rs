//! `agent`: a thin shell over the agent library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let flags = agent::config::Flags::parse();
    init_logging(&flags.log_format);
    let config = match agent::config::Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match agent::run(config, wait_for_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent stopped");
            eprintln!("agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
