//! tendril-proxy: validate flags (exit 64 on a usage error), bind, run until SIGTERM or
//! SIGINT, drain.

use std::process::ExitCode;

use clap::Parser;
use tendril_proxy::App;
use tendril_proxy::config::ProxyArgs;

/// Destroy every socket on this host connected to an address (for example a demoted master
/// that clients still reach directly), with the socket killer the proxy uses.
#[derive(Debug, Parser)]
#[command(name = "tendril-proxy kill")]
struct KillArgs {
    /// The address the sockets are connected to.
    #[arg(long)]
    peer: std::net::SocketAddr,
    /// Only count them.
    #[arg(long)]
    dry_run: bool,
}

fn kill(args: KillArgs) -> ExitCode {
    let mut killer = tendril_ebpf::SocketKiller::load();
    for why in killer.fallbacks() {
        eprintln!("note: {why}");
    }
    let target = [tendril_ebpf::Target::peer(args.peer)];
    let result = if args.dry_run {
        killer.count(&target)
    } else {
        killer.kill(&target)
    };
    match result {
        Ok(r) => {
            let verb = if args.dry_run { "found" } else { "destroyed" };
            let n = if args.dry_run { r.matched } else { r.destroyed };
            println!(
                "{verb} {n} sockets connected to {} (mechanism {}, {} sockets scanned in {:?}, {} errors)",
                args.peer,
                r.mechanism.label(),
                r.scanned,
                r.elapsed,
                r.errors
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tendril-proxy kill: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("kill") {
        return kill(KillArgs::parse_from(std::env::args().skip(1)));
    }
    let args: ProxyArgs = match tendril_daemon::config_file::parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("tendril-proxy: {e}");
            return ExitCode::from(64);
        }
    };
    tendril_daemon::init_logging("info");
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tendril-proxy: invalid configuration:\n  - {e}");
            return ExitCode::from(64);
        }
    };
    match App::start(config, tendril_daemon::shutdown_signal()) {
        Ok(app) => {
            app.wait();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tendril-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
