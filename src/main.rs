//! The `sluice` command line: thin on purpose. Parse arguments, set up logging, load the
//! config, and hand over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use sluice::config::{self, JobConfig};

// Records, batches and window state are many small allocations on every core: glibc's
// allocator spent a third of the window operator's time in malloc/free (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use sluice::sink::target::{target_kind, Admin, TxnCommand};

#[derive(Parser)]
#[command(name = "sluice", version, about = "Kafka to a database, exactly once")]
struct Cli {
    /// Log lines as `text` or as one JSON object per line (`json`) for log shippers.
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", default_value = "text")]
    log_format: sluice::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job until Ctrl-C / SIGTERM (then stop after a final checkpoint).
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Start without a checkpoint even though the job's consumer group shows it ran
        /// before (refused otherwise: it would write again what was written).
        #[arg(long)]
        fresh_start: bool,
        /// Restore this savepoint (its directory) instead of starting anew; a restart
        /// later resumes from the job's own checkpoints taken since. A split job is
        /// rescaled by giving the savepoint of each of its old instances, the option
        /// once per savepoint.
        #[arg(long)]
        from_savepoint: Vec<PathBuf>,
        /// Start even if the restored state holds operators the job no longer has
        /// (their state is dropped).
        #[arg(long)]
        allow_non_restored_state: bool,
        /// Run instance k of a job split over `cluster.instances` processes (the same as
        /// `cluster.instance` and SLUICE__CLUSTER__INSTANCE).
        #[arg(long)]
        instance: Option<u32>,
        /// Instances the job is split over (the same as `cluster.instances`).
        #[arg(long)]
        instances: Option<u32>,
    },
    /// Take a savepoint of the running job through its HTTP API and print its
    /// directory; with `--stop`, the job stops after it (needs `SLUICE_API_TOKEN`).
    Savepoint {
        #[arg(long, short)]
        config: PathBuf,
        /// Stop the job with the savepoint as its final checkpoint.
        #[arg(long)]
        stop: bool,
    },
    /// A job split over instances, as its shared checkpoint storage shows it.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Show the checkpoints and savepoints a job has stored.
    Checkpoints {
        #[command(subcommand)]
        action: CheckpointsAction,
    },
    /// List or delete the job's savepoints (in `checkpoint.savepoint_dir`).
    Savepoints {
        #[command(subcommand)]
        action: SavepointsAction,
    },
    /// Run a session service: jobs are submitted, listed and cancelled over its HTTP
    /// API, each in a process of its own (see docs/session-mode.md).
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file and print the resolved job; exits non-zero if it is invalid.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Also reach the source, the sink's target and the checkpoint storage, and check
        /// what the job needs there (topics, the table and its columns, privileges),
        /// changing nothing.
        #[arg(long)]
        connect: bool,
    },
    /// Prove exactly-once on this deployment: run the job against a fresh topic on its
    /// Kafka and a fresh table beside its target, crash it at the protocol's narrow
    /// windows, and compare the target with what the input must give. Exits 0 only when
    /// the target is exactly right.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// Records to produce.
        #[arg(long, default_value_t = 5_000)]
        records: u64,
        /// Crashes to put the job through (SIGKILLs and failpoints, in turn).
        #[arg(long, default_value_t = 4)]
        kills: usize,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
        /// Keep the verification topic, table and checkpoints.
        #[arg(long)]
        keep: bool,
        /// The verification topic's name (refused if it exists); default
        /// `sluice-verify-<random>`.
        #[arg(long)]
        topic: Option<String>,
        /// Seed of the input's random choices, to repeat a run's input.
        #[arg(long)]
        seed: Option<u64>,
        /// How long the last run may take to write everything.
        #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Where the kills land, in turn: `sigkill` (a random moment while records flow)
        /// or a failpoint (after_prepare, before_store, before_commit, after_commit,
        /// during_restore). Default: every point the strategy has.
        #[arg(long, value_delimiter = ',')]
        at: Vec<String>,
    },
    /// Apply the sink's migrations (`sink.migrations`).
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Produce sample events (the embedded default's generator) to a Kafka topic until
    /// Ctrl-C: a feed for trying a job against a real broker.
    Generate {
        #[arg(long, default_value = "127.0.0.1:9092")]
        bootstrap_servers: String,
        #[arg(long, default_value = "events")]
        topic: String,
        /// Events per second.
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        /// Every n-th event is malformed (0: never).
        #[arg(long, default_value_t = 1000)]
        bad_every: u64,
    },
    /// Exit 0 if a running job's HTTP API answers (`/health`, or `/ready` with
    /// `--ready`), 1 otherwise: a container's HEALTHCHECK without curl in the image.
    Health {
        /// The API's address.
        #[arg(long, default_value = "127.0.0.1:9464", env = "SLUICE__METRICS__LISTEN")]
        listen: String,
        /// Ask `/ready` instead of `/health`.
        #[arg(long)]
        ready: bool,
    },
    /// Show or resolve this job's prepared transactions (two-phase sink) by hand.
    Txn {
        #[command(subcommand)]
        action: TxnAction,
    },
}

#[derive(Subcommand)]
enum CheckpointsAction {
    /// List the job's checkpoints and savepoints: id, time, kind, size, operators.
    List {
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one checkpoint file or savepoint directory in full, its files checked.
    Inspect {
        /// A `chk-<id>.json` file or a savepoint's directory.
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum SavepointsAction {
    /// The savepoints in the job's savepoint directory, oldest first, each checked.
    List {
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete savepoints: those named, or all but the newest `--keep N`. A savepoint the
    /// job would restore at its next start (`checkpoint.from_savepoint`, no checkpoint of
    /// its own since) is kept unless `--force`.
    Delete {
        #[arg(long, short)]
        config: PathBuf,
        /// Savepoint directories to delete.
        paths: Vec<PathBuf>,
        /// Keep the newest N savepoints, delete the older ones.
        #[arg(long)]
        keep: Option<usize>,
        /// Delete even a savepoint the job would restore at its next start.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// One line per instance: its newest checkpoint and its age, the input partitions
    /// it holds offsets of and their lag, and the process holding its slot.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TxnAction {
    /// List this job's prepared transactions.
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// COMMIT PREPARED one transaction (or all of this job's with --all).
    Commit {
        #[arg(long, short)]
        config: PathBuf,
        gid: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// ROLLBACK PREPARED one transaction (or all of this job's with --all).
    Abort {
        #[arg(long, short)]
        config: PathBuf,
        gid: Option<String>,
        #[arg(long)]
        all: bool,
    },
}

/// `println!` that does not panic when stdout is gone (`sluice check | head`): a closed
/// pipe is the reader's choice, not an error of ours.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

// mimalloc reserves its first arena at the first allocation, before `main`: the
// settings must be in place before that (see sluice::allocator).
sluice::tune_allocator_before_main!();

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.log_format == sluice::logging::LogFormat::Json;
    sluice::logging::init(cli.log_format, std::env::var("RUST_LOG").ok().as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command, cli.log_format));
    // A blocking call still running (a Kafka poll, a file write) must not keep the
    // process from exiting once the job is over.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A shipper parses the last word too; a person reads it plainly.
        Err(e) if json => {
            tracing::error!(
                error = sluice::config::redact_urls_in(&format!("{e:#}")),
                "sluice stopped"
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            // Not eprintln!: a session job's stderr is a pipe its server may have closed.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "error: {}",
                sluice::config::redact_urls_in(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> anyhow::Result<JobConfig> {
    Ok(config::load(path)?)
}

/// [`load`] for a command about one instance's checkpoints or transactions: a split
/// job's instance must be named (a process claiming its slot has none in the file).
fn load_instance(path: &Path) -> anyhow::Result<JobConfig> {
    let cfg = load(path)?;
    anyhow::ensure!(
        !cfg.cluster.is_split() || cfg.cluster.instance.is_some(),
        "the job is split over {} instances: name the one this is about with SLUICE__CLUSTER__INSTANCE=k \
         (`sluice cluster status` shows them all)",
        cfg.cluster.instances
    );
    Ok(cfg)
}

/// [`load`] with the command line's `--instance` and `--instances` over the file and the
/// environment (checked like any other key).
fn load_slot(path: &Path, instance: Option<u32>, instances: Option<u32>) -> anyhow::Result<JobConfig> {
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    if let Some(k) = instance {
        env.push(("SLUICE__CLUSTER__INSTANCE".into(), k.to_string()));
    }
    if let Some(n) = instances {
        env.push(("SLUICE__CLUSTER__INSTANCES".into(), n.to_string()));
    }
    Ok(config::load_with_env(path, &env)?)
}

async fn dispatch(command: Command, log_format: sluice::logging::LogFormat) -> anyhow::Result<()> {
    match command {
        Command::Run {
            config,
            fresh_start,
            from_savepoint,
            allow_non_restored_state,
            instance,
            instances,
        } => {
            let mut cfg = load_slot(&config, instance, instances)?;
            cfg.source.fresh_start |= fresh_start;
            cfg.checkpoint.allow_non_restored_state |= allow_non_restored_state;
            let mut given = from_savepoint.into_iter();
            if let Some(first) = given.next() {
                cfg.checkpoint.from_savepoint = Some(first);
                cfg.checkpoint.with_savepoints = given.collect();
            }
            run(cfg).await
        }
        Command::Savepoint { config, stop } => savepoint(&load_instance(&config)?, stop).await,
        Command::Checkpoints { action } => checkpoints(action),
        Command::Savepoints { action } => savepoints(action),
        Command::Cluster {
            action: ClusterAction::Status { config, json },
        } => {
            // Any instance's view will do: the command reads them all.
            let cfg = load_slot(&config, Some(0), None)?;
            let rows = tokio::task::spawn_blocking(move || sluice::app::cluster::status(&cfg)).await??;
            match json {
                true => say!("{}", serde_json::to_string_pretty(&rows)?),
                false => say!("{}", sluice::app::cluster::table(&rows).trim_end()),
            }
            Ok(())
        }
        Command::Verify {
            config,
            records,
            kills,
            json,
            keep,
            topic,
            seed,
            timeout,
            at,
        } => {
            let opts = sluice::verify::Options {
                config,
                records,
                kills,
                keep,
                topic,
                seed,
                timeout,
                at,
            };
            let report = match sluice::verify::run(&opts).await {
                Ok(r) => r,
                // A pipeline reading --json gets an answer it can parse either way.
                Err(e) if json => {
                    let error = sluice::config::redact_urls_in(&format!("{e:#}"));
                    say!("{}", serde_json::json!({ "passed": false, "error": error }));
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
            match json {
                true => say!("{}", serde_json::to_string_pretty(&report)?),
                false => say!("{}", report.text().trim_end()),
            }
            anyhow::ensure!(report.passed, "verification failed: {}", report.problems.join("; "));
            Ok(())
        }
        Command::Check { config, connect } => {
            let cfg = load(&config)?;
            let plan = sluice::app::plan(&cfg, &Arc::new(sluice::telemetry::JobStats::default()))?;
            say!("{}: ok", config.display());
            say!("job `{}`:\n{}", cfg.job.name, plan.graph.describe());
            let columns: Vec<&str> = plan.table.columns.iter().map(|c| c.name.as_str()).collect();
            let key: Vec<&str> = plan.table.key.iter().map(|i| columns[*i]).collect();
            say!(
                "  sink table {}: columns ({}), key ({})",
                plan.table.table,
                columns.join(", "),
                key.join(", ")
            );
            if connect {
                let mut faults = 0;
                for p in sluice::app::probe::probe(&cfg).await {
                    match p.result {
                        Ok(found) => say!("  {}: ok: {found}", p.what),
                        Err(why) => {
                            faults += 1;
                            say!("  {}: FAULT: {why}", p.what);
                        }
                    }
                }
                anyhow::ensure!(
                    faults == 0,
                    "{}: {faults} fault(s) found by --connect",
                    config.display()
                );
            }
            Ok(())
        }
        Command::Migrate { config } => migrate(load(&config)?).await,
        Command::Txn { action } => txn(action).await,
        Command::Health { listen, ready } => health(&listen, ready).await,
        Command::Serve { config } => {
            let cfg = sluice::session::load(&config)?;
            let (stop_tx, stop_rx) = watch::channel(false);
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("signal: stopping every job after its final checkpoint");
                stop_tx.send_replace(true);
            });
            Ok(sluice::session::serve(cfg, log_format, stop_rx).await?)
        }
        Command::Generate {
            bootstrap_servers,
            topic,
            rate,
            bad_every,
        } => generate(bootstrap_servers, topic, rate, bad_every).await,
    }
}

async fn run(cfg: JobConfig) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal: stopping after a final checkpoint (signal again to quit at once)");
        stop_tx.send_replace(true);
        wait_for_signal().await;
        tracing::warn!("second signal: quitting without a final checkpoint");
        std::process::exit(130);
    });
    let stats = Arc::new(sluice::telemetry::JobStats::default());
    let mut look = Vec::new();
    if !cfg.metrics.listen.is_empty() {
        look.push(format!("http://{}/", cfg.metrics.listen));
    }
    look.push(format!(
        "sink {} table {}",
        config::redact_url(&cfg.sink.url),
        cfg.sink.table
    ));
    let status = tokio::spawn(sluice::telemetry::print_status(
        stats.clone(),
        cfg.job.status_interval,
        look.join(" | "),
    ));
    sluice::logging::set_job(&cfg.job.name);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting");
    let result = sluice::app::run(cfg, stop_rx, stats).await;
    status.abort();
    result.context("job failed")
}

async fn health(listen: &str, ready: bool) -> anyhow::Result<()> {
    let path = if ready { "/ready" } else { "/health" };
    // An API bound to every interface is asked on loopback.
    let url = format!("http://{}{path}", listen.replace("0.0.0.0", "127.0.0.1"));
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()
        .context("HTTP client")?;
    let answer = client.get(&url).send().await.with_context(|| url.clone())?;
    let status = answer.status();
    let body = answer.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{url}: {status}: {}", body.trim());
    say!("{}", body.trim());
    Ok(())
}

async fn savepoint(cfg: &JobConfig, stop: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        !cfg.metrics.listen.is_empty(),
        "metrics.listen is empty: the job has no HTTP API to ask for a savepoint"
    );
    let token = sluice::api::token_from_env().with_context(|| {
        format!(
            "{} is not set: the job's API refuses savepoints without it",
            sluice::api::TOKEN_ENV
        )
    })?;
    let url = format!(
        "http://{}/savepoints{}",
        cfg.metrics.listen.replace("0.0.0.0", "127.0.0.1"),
        if stop { "?stop=true" } else { "" }
    );
    // The job answers once the savepoint is written: its checkpoint, then the copy.
    let wait = (cfg.checkpoint.interval + cfg.checkpoint.timeout) * 2 + std::time::Duration::from_secs(10);
    let client = reqwest::Client::builder()
        .timeout(wait)
        .build()
        .context("HTTP client")?;
    let answer = client
        .post(&url)
        .bearer_auth(secrecy::ExposeSecret::expose_secret(token.as_ref()))
        .send()
        .await
        .with_context(|| format!("{url}: is the job running?"))?;
    let status = answer.status();
    let body: serde_json::Value = serde_json::from_str(&answer.text().await.unwrap_or_default()).unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "{url}: {status}: {}",
        body.get("error").and_then(|e| e.as_str()).unwrap_or("")
    );
    let path = body.get("savepoint").and_then(|p| p.as_str()).unwrap_or_default();
    say!("{path}");
    tracing::info!(
        checkpoint = body.get("checkpoint").and_then(|c| c.as_u64()),
        stop,
        "savepoint written: restore it with `sluice run --config ... --from-savepoint {path}`"
    );
    Ok(())
}

/// `sluice savepoints list|delete` when `checkpoint.savepoint_dir` is a bucket
/// (`s3://…`); `None` when it is a directory.
#[cfg(feature = "s3")]
fn bucket_savepoints(action: &SavepointsAction) -> anyhow::Result<Option<()>> {
    use sluice::checkpoint::object::ObjectStorage;
    let (SavepointsAction::List { config, .. } | SavepointsAction::Delete { config, .. }) = action;
    let cfg = load_instance(config)?;
    let Some(root) = cfg
        .checkpoint
        .savepoint_dir
        .as_ref()
        .and_then(|d| d.to_str())
        .filter(|d| d.starts_with("s3://"))
        .map(|d| d.trim_end_matches('/').to_string())
    else {
        return Ok(None);
    };
    let mut object = sluice::app::object_config(&cfg.checkpoint);
    object.url = root.clone();
    let bucket = ObjectStorage::open(&object)?;
    let names = bucket.savepoint_names()?;
    match action {
        SavepointsAction::List { json, .. } => {
            for n in &names {
                match json {
                    true => say!(
                        "{}",
                        serde_json::json!({ "kind": "savepoint", "path": format!("{root}/{n}") })
                    ),
                    false => say!("{root}/{n}"),
                }
            }
            if names.is_empty() && !json {
                say!("(no savepoint)");
            }
        }
        SavepointsAction::Delete { paths, keep, force, .. } => {
            anyhow::ensure!(
                paths.is_empty() != keep.is_none(),
                "name the savepoints to delete, or give --keep N (not both)"
            );
            let targets: Vec<String> = match keep {
                Some(n) => names[..names.len().saturating_sub(*n)].to_vec(),
                None => paths
                    .iter()
                    .map(|p| {
                        let url = p.display().to_string();
                        sluice::checkpoint::object::split_savepoint_url(&url)
                            .filter(|(r, _)| *r == root)
                            .map(|(_, n)| n.to_string())
                            .ok_or_else(|| anyhow::anyhow!("{url}: not a savepoint under {root}"))
                    })
                    .collect::<anyhow::Result<_>>()?,
            };
            let in_use = sluice::app::savepoint_in_use(&cfg)?;
            for n in &targets {
                let url = format!("{root}/{n}");
                if let Some((_, why)) = in_use.iter().find(|(p, _)| p.to_str() == Some(url.as_str())) {
                    anyhow::ensure!(*force, "{url}: kept: {why} (--force deletes it anyway)");
                }
                bucket.delete_savepoint(n)?;
                say!("deleted {url}");
            }
            say!("{} savepoint(s) deleted", targets.len());
        }
    }
    Ok(Some(()))
}

fn savepoints(action: SavepointsAction) -> anyhow::Result<()> {
    use sluice::checkpoint::inspect;
    let listed = |cfg: &JobConfig| -> anyhow::Result<Vec<inspect::Entry>> {
        let dir = cfg
            .checkpoint
            .savepoints()
            .ok_or_else(|| anyhow::anyhow!("the job has no savepoint directory (checkpoint.savepoint_dir)"))?;
        Ok(inspect::list(None, Some(&dir))?)
    };
    #[cfg(feature = "s3")]
    if let Some(done) = bucket_savepoints(&action)? {
        return Ok(done);
    }
    match action {
        SavepointsAction::List { config, json } => {
            let cfg = load_instance(&config)?;
            let all = listed(&cfg)?;
            for e in &all {
                match json {
                    true => say!("{}", serde_json::to_string(e)?),
                    false => say!(
                        "{:>16} {:<20} {:>12}  {}{}",
                        e.id,
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.triggered_at_ms)
                        ),
                        e.bytes,
                        e.path.display(),
                        e.problem
                            .as_deref()
                            .map(|p| format!("  PROBLEM: {p}"))
                            .unwrap_or_default()
                    ),
                }
            }
            if all.is_empty() && !json {
                say!("(no savepoint)");
            }
            Ok(())
        }
        SavepointsAction::Delete {
            config,
            paths,
            keep,
            force,
        } => {
            let cfg = load_instance(&config)?;
            anyhow::ensure!(
                paths.is_empty() != keep.is_none(),
                "name the savepoints to delete, or give --keep N (not both)"
            );
            let targets: Vec<PathBuf> = match keep {
                Some(n) => {
                    let all = listed(&cfg)?;
                    let older = all.len().saturating_sub(n);
                    all.into_iter().take(older).map(|e| e.path).collect()
                }
                None => paths,
            };
            let in_use = sluice::app::savepoint_in_use(&cfg)?;
            let mut freed = 0;
            for path in &targets {
                let same = |p: &Path| std::fs::canonicalize(p).ok() == std::fs::canonicalize(path).ok();
                if let Some(why) = in_use.iter().find(|(p, _)| same(p)).map(|(_, why)| why) {
                    anyhow::ensure!(force, "{}: kept: {why} (--force deletes it anyway)", path.display());
                }
                freed += sluice::checkpoint::savepoint::delete(path)?;
                say!("deleted {}", path.display());
            }
            say!("{} savepoint(s) deleted, {freed} bytes of state", targets.len());
            Ok(())
        }
    }
}

fn checkpoints(action: CheckpointsAction) -> anyhow::Result<()> {
    use sluice::checkpoint::inspect;
    let when = |ms: u64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
    };
    match action {
        CheckpointsAction::List { config, json } => {
            let cfg = load_instance(&config)?;
            let savepoints = cfg.checkpoint.savepoints();
            let all = inspect::list(cfg.checkpoint.dir.as_deref(), savepoints.as_deref())?;
            #[cfg(feature = "s3")]
            let all = {
                let mut all = all;
                if cfg.checkpoint.storage == config::StorageKind::S3 {
                    use sluice::checkpoint::object::ObjectStorage;
                    let storage = ObjectStorage::open(&sluice::app::object_config(&cfg.checkpoint))?;
                    all.extend(inspect::list_object(&storage)?);
                    all.sort_by_key(|e| (e.triggered_at_ms, e.id));
                }
                all
            };
            if json {
                for e in &all {
                    say!("{}", serde_json::to_string(e)?);
                }
                return Ok(());
            }
            say!(
                "{:<10} {:>16} {:<20} {:>12}  {:<30} path",
                "kind",
                "id",
                "taken",
                "bytes",
                "operators (bytes)"
            );
            for e in &all {
                let ops: Vec<String> = e.operators.iter().map(|(op, s)| format!("{op}:{}", s.bytes)).collect();
                let kind = match e.kind {
                    inspect::Kind::Checkpoint => "checkpoint",
                    inspect::Kind::Savepoint => "savepoint",
                };
                say!(
                    "{kind:<10} {:>16} {:<20} {:>12}  {:<30} {}{}",
                    e.id,
                    when(e.triggered_at_ms),
                    e.bytes,
                    ops.join(" "),
                    e.path.display(),
                    e.problem
                        .as_deref()
                        .map(|p| format!("  PROBLEM: {p}"))
                        .unwrap_or_default()
                );
            }
            if all.is_empty() {
                say!("(nothing stored)");
            }
            Ok(())
        }
        CheckpointsAction::Inspect { path } => {
            let e = inspect::inspect(&path)?;
            say!("{}", serde_json::to_string_pretty(&e)?);
            anyhow::ensure!(
                e.problem.is_none(),
                "{}: {}",
                path.display(),
                e.problem.unwrap_or_default()
            );
            Ok(())
        }
    }
}

async fn generate(bootstrap: String, topic: String, rate: u32, bad_every: u64) -> anyhow::Result<()> {
    anyhow::ensure!(rate > 0, "--rate must be at least 1");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let cfg = sluice::config::EmbeddedConfig {
        partitions: 1,
        events_per_second: rate,
        bad_record_every: bad_every,
    };
    tracing::info!(rate, topic, bootstrap, "producing sample events until Ctrl-C");
    tokio::task::spawn_blocking(move || sluice::source::embedded::generate_to(&bootstrap, &topic, &cfg, &stop))
        .await
        .context("generator thread")??;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn migrate(cfg: JobConfig) -> anyhow::Result<()> {
    let dir = cfg
        .sink
        .sql()
        .and_then(|s| s.migrations.clone())
        .context("sink.migrations is not set: nothing to migrate")?;
    let target = target_kind(cfg.sink.kind())?;
    let Some(migrate) = target.migrate else {
        anyhow::bail!("a {} sink has no migrations", cfg.sink.kind().name());
    };
    migrate(&sluice::app::sink_context(&cfg), &dir).await?;
    say!("migrations in {} applied", dir.display());
    Ok(())
}

/// `sluice txn`: the sink target's transaction admin.
async fn txn(action: TxnAction) -> anyhow::Result<()> {
    let (config, command) = match action {
        TxnAction::List { config } => (config, TxnCommand::List),
        TxnAction::Commit { config, gid, all } => (config, TxnCommand::Resolve { gid, all, commit: true }),
        TxnAction::Abort { config, gid, all } => (
            config,
            TxnCommand::Resolve {
                gid,
                all,
                commit: false,
            },
        ),
    };
    let cfg = load_instance(&config)?;
    let Some(txn) = target_kind(cfg.sink.kind())?.txn else {
        anyhow::bail!(
            "a {} sink has no transactions to resolve (prepared transactions exist in a postgres sink, Kafka \
             transactions in a kafka sink)",
            cfg.sink.kind().name()
        );
    };
    let spec = || Ok(sluice::app::plan(&cfg, &std::sync::Arc::default())?.table);
    let storage = || {
        sluice::app::open_storage(&cfg).map_err(|e| {
            sluice::Error::Unsupported(format!(
                "read the job's checkpoints (is the job running? stop it first): {e}"
            ))
        })
    };
    let ctx = sluice::app::sink_context(&cfg);
    let admin = Admin {
        ctx: &ctx,
        spec: &spec,
        storage: &storage,
    };
    for line in txn(&admin, &command).await? {
        say!("{line}");
    }
    Ok(())
}
