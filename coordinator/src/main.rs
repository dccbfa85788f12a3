//! `coordinator`: a thin shell over the coordinator library.

use clap::{Parser, Subcommand};
use coordinator::config::{Config, ConfigArgs};

/// Control plane of the edge cloud: identity, placement, scheduling and the
/// OpenStack-compatible APIs, with all state in etcd or an embedded store.
///
/// Configuration comes from defaults, then the TOML file (--config), then
/// EDGECLOUD_* environment variables, then flags; later sources win.
#[derive(Parser)]
#[command(name = "coordinator", version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log format: `text` or `json`.
    #[arg(long, env = "EDGECLOUD_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the APIs (the default).
    Serve,
    /// Create the Default domain, admin project and user, roles and catalog; safe to run again.
    Bootstrap {
        /// Password of the admin user (kept if the user exists, unless --reset-password).
        #[arg(long, env = "EDGECLOUD_ADMIN_PASSWORD")]
        admin_password: String,
        /// Name of the admin user.
        #[arg(long, default_value = "admin")]
        admin_user: String,
        /// Name of the admin project.
        #[arg(long, default_value = "admin")]
        admin_project: String,
        /// Set the admin password even if the user already exists.
        #[arg(long)]
        reset_password: bool,
    },
    /// Host join tokens.
    JoinToken {
        #[command(subcommand)]
        command: JoinTokenCommand,
    },
    /// Token key management.
    Fernet {
        #[command(subcommand)]
        command: FernetCommand,
    },
}

#[derive(Subcommand)]
enum JoinTokenCommand {
    /// Create a one-use join token and print it.
    Create {
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
        /// Restrict the token to this host name.
        #[arg(long)]
        host: Option<String>,
    },
}

#[derive(Subcommand)]
enum FernetCommand {
    /// Add a new primary key; tokens signed with the previous keys stay valid until they expire.
    Rotate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let config = Config::load(&cli.config)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => coordinator::server::serve(config).await?,
        Command::Bootstrap { admin_password, admin_user, admin_project, reset_password } => {
            let store = coordinator::server::open_store(&config).await?;
            let report = coordinator::identity::bootstrap::run(
                store,
                &config,
                &coordinator::identity::bootstrap::Options { admin_password, admin_user, admin_project, reset_password },
            )
            .await?;
            println!("{report}");
        }
        Command::JoinToken { command: JoinTokenCommand::Create { ttl, host } } => {
            let store = coordinator::server::open_store(&config).await?;
            let token = coordinator::hosts::create_join_token(store.as_ref(), ttl, host).await?;
            println!("{token}");
        }
        Command::Fernet { command: FernetCommand::Rotate } => {
            let store = coordinator::server::open_store(&config).await?;
            let n = coordinator::identity::tokens::rotate_keys(store.as_ref()).await?;
            println!("Rotated token keys; {n} keys active.");
        }
    }
    Ok(())
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
