//! Runs a parsed command and prints its result.

use std::io::Read;
use std::path::Path;

use serde_json::Value;
use tendril_control_model::{ClusterSpec, Keys, encode_pretty};
use tendril_control_store::EtcdStore;

use crate::args::{
    Cli, ClusterDataCommand, Command, K8sCommand, ManifestFormat, ManifestsArgs, Output,
};
use crate::{Ctl, CtlError, SpecChange, parse_json};

/// Runs `cli`, printing results on standard output.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    if let Command::Spec(args) = &cli.command
        && args.defaults
    {
        println!("{}", encode_pretty(&ClusterSpec::default()));
        return Ok(());
    }
    let cluster = cli.cluster_name.as_deref().ok_or_else(|| {
        CtlError::Usage("--cluster-name (or TENDRIL_CLUSTER_NAME) is required".into())
    })?;
    if let Command::K8s(K8sCommand::Manifests(args)) = &cli.command {
        let options = k8s_options(cluster, &cli.store.store_endpoints, args);
        let manifests = tendril_k8s::manifests(&options)?;
        let text = match args.output {
            ManifestFormat::Yaml => tendril_k8s::to_yaml(&manifests)?,
            ManifestFormat::Json => tendril_k8s::to_json_list(&manifests)?,
        };
        print!("{text}");
        return Ok(());
    }
    let keys = Keys::new(cluster).map_err(|e| CtlError::Usage(e.to_string()))?;
    let config = cli.store.to_config()?;
    let store = EtcdStore::connect(&config).await?;
    let ctl = Ctl::new(store, cluster, keys);
    match cli.command {
        Command::Init(args) => {
            let value = match (&args.spec, &args.file) {
                (Some(text), _) => parse_json(text, "the spec")?,
                (None, Some(path)) => parse_json(&read_input(path)?, "the spec file")?,
                (None, None) => Value::Object(Default::default()),
            };
            let spec = ClusterSpec::from_json_value(&value).map_err(CtlError::Spec)?;
            let cd = ctl.init(spec, args.force).await?;
            println!(
                "cluster {cluster:?} initialised (uid {}, init mode {})",
                cd.uid,
                cd.spec.init_mode.as_str()
            );
        }
        Command::Spec(_) => {
            let (cd, _) = ctl.read().await?;
            println!("{}", encode_pretty(&cd.spec));
        }
        Command::Update(args) => {
            let change = match (args.patch, args.file) {
                (Some(patch), _) => SpecChange::Patch(parse_json(&patch, "the patch")?),
                (None, Some(path)) => {
                    SpecChange::Replace(parse_json(&read_input(&path)?, "the spec file")?)
                }
                (None, None) => return Err(CtlError::Usage("give --patch or --file".into())),
            };
            let cd = ctl.update(&change).await?;
            println!("spec updated (cluster data generation {})", cd.generation);
        }
        Command::Clusterdata(ClusterDataCommand::Read) => {
            let kv = ctl.read_raw().await?;
            // Print what is stored even if this build cannot use it: this is the tool to look
            // at (and then repair) bad data.
            match serde_json::from_slice::<Value>(&kv.value) {
                Ok(value) => println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                ),
                Err(_) => println!("{}", String::from_utf8_lossy(&kv.value)),
            }
        }
        Command::Status(args) => {
            let status = ctl.status().await?;
            match args.output {
                Output::Table => print!("{}", crate::ops::render_table(&status)),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                ),
            }
        }
        Command::Switchover(args) => {
            println!("switchover requested; proxies hold new connections while it runs");
            let done = ctl.switchover(args.to.as_deref(), args.timeout).await?;
            println!("{done}");
        }
        Command::Failkeeper(k) => {
            ctl.failkeeper(&k.keeper).await?;
            println!(
                "keeper {} marked failed; the sentinel acts on it in its next decision",
                k.keeper
            );
        }
        Command::Removekeeper(k) => {
            ctl.removekeeper(&k.keeper).await?;
            println!(
                "keeper {} and its database removed from the cluster data",
                k.keeper
            );
        }
        // Printed above, before connecting to the store (it reads nothing from it).
        Command::K8s(_) => {}
        Command::Promote => {
            ctl.promote().await?;
            println!(
                "standby cluster promoted: its leader stops following the external primary and \
                 accepts writes once its keeper promoted it (see `tendrilctl status`)"
            );
        }
        Command::Clusterdata(ClusterDataCommand::Write { file, yes }) => {
            if !yes {
                return Err(CtlError::Usage(
                    "clusterdata write overwrites what the sentinel wrote; confirm with --yes"
                        .into(),
                ));
            }
            let text = read_input(&file)?;
            let cd = ctl.write_cluster_data(text.as_bytes()).await?;
            println!("cluster data written (generation {})", cd.generation);
        }
    }
    Ok(())
}

fn read_input(path: &Path) -> Result<String, CtlError> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| CtlError::Input(format!("cannot read standard input: {e}")))?;
        return Ok(text);
    }
    std::fs::read_to_string(path)
        .map_err(|e| CtlError::Input(format!("cannot read {}: {e}", path.display())))
}

/// The manifests' options from the command line; passwords are generated here (the
/// library stays deterministic) unless an existing Secret is named.
fn k8s_options(cluster: &str, endpoints: &[String], a: &ManifestsArgs) -> tendril_k8s::Options {
    use rand::Rng;
    let password = || -> String {
        rand::rng()
            .sample_iter(&rand::distr::Alphanumeric)
            .take(32)
            .map(char::from)
            .collect()
    };
    let mut o = tendril_k8s::Options::new(cluster, &a.image, endpoints.to_vec());
    o.namespace.clone_from(&a.namespace);
    o.keepers = a.keepers;
    o.sentinels = a.sentinels;
    o.storage_class.clone_from(&a.storage_class);
    o.storage_size.clone_from(&a.storage_size);
    o.synchronous_replication = a.synchronous_replication;
    o.read_only = a.read_only;
    o.secret = match &a.secret {
        Some(name) => tendril_k8s::SecretSource::Existing(name.clone()),
        None => tendril_k8s::SecretSource::Generate {
            su: password(),
            repl: password(),
        },
    };
    o.resources = tendril_k8s::Resources {
        keeper_cpu: a.keeper_cpu.clone(),
        keeper_memory: a.keeper_memory.clone(),
        sentinel_cpu: a.sentinel_cpu.clone(),
        sentinel_memory: a.sentinel_memory.clone(),
        proxy_cpu: a.proxy_cpu.clone(),
        proxy_memory: a.proxy_memory.clone(),
    };
    o
}
