//! The ten-line service of docs/codegen.md: `hello serve ADDR`, then `hello ADDR hello NAME`.
use dombus::{Net, Server, ServerConfig};

/// Greets.
#[dombus::service]
pub trait Hello {
    /// Says hello to `name`.
    #[idempotent]
    async fn hello(&self, name: String, excited: bool) -> String;
}

struct Host;
impl Hello for Host {
    async fn hello(&self, name: String, excited: bool) -> String {
        format!("hello, {name}{}", if excited { "!" } else { "." })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.len() == 3 && argv[1] == "serve" {
        let server = Server::new(Net::new(), ServerConfig::default());
        server.serve(&argv[2].parse()?, Host.into_service()).await?;
        tokio::signal::ctrl_c().await?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    Ok(dombus::rpc::cli::main_for::<HelloRequest>("hello", argv).await)
}
