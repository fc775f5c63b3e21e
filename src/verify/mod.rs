//! `sluice verify`: a user proves exactly-once on their own deployment. The job's
//! config is run against a fresh topic on its Kafka cluster and a fresh table (topic,
//! key prefix, directory) beside its own target, fed sequence-numbered records shaped
//! for it, crashed at the protocol's narrow windows through the binary's failpoints,
//! and, once caught up, its target is compared with what the input must give: every
//! record exactly once, or every window equal to a reference computation; the bad and
//! late records in the dead letters; no transaction left open.
//!
//! - [`shape`]: what of the job can be checked, from its config
//! - [`input`]: the records
//! - [`dimension`]: the rows an enriching job looks up, read from its store
//! - [`reference`]: windows computed the plain way
//! - [`kafka`]: the topic, producing, reading back
//! - [`target`]: the verification table and reading it
//! - [`files`]: a files sink's part files read back, from a directory or S3
//! - [`child`]: the job as a child process
//! - [`report`]: the findings

pub mod child;
pub mod dimension;
pub mod files;
pub mod input;
pub mod kafka;
pub mod reference;
pub mod report;
pub mod shape;
pub mod target;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::config::{DeadLetterKind, JobConfig, SinkKind, StorageKind, Strategy};
use crate::error::{Error, Result};
use child::Child;
use input::{Input, Kind, Rec};
use kafka::Cluster;
use report::{Kill, Report, WindowDiff, Windows};
use shape::{Job, Shape};

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The job's config file.
    pub config: PathBuf,
    /// Good records to produce.
    pub records: u64,
    /// Crashes to put the job through.
    pub kills: usize,
    /// Keep the topic, table and checkpoints afterwards.
    pub keep: bool,
    /// The verification topic's name (default: `sluice-verify-<id>`); refused if it exists.
    pub topic: Option<String>,
    /// Seed of the input's random choices (default: random).
    pub seed: Option<u64>,
    /// How long the last run may take to write everything.
    pub timeout: Duration,
    /// Where the kills land, in turn (default: every point the strategy has).
    pub at: Vec<String>,
}

/// Where one kill lands: a SIGKILL while records flow, or a failpoint.
fn kill_points(strategy: Strategy) -> &'static [&'static str] {
    match strategy {
        Strategy::TwoPhase | Strategy::Wal => &[
            "sigkill",
            "before_commit",
            "after_prepare",
            "before_store",
            "after_commit",
            "during_restore",
        ],
        Strategy::Idempotent | Strategy::AtLeastOnce => &["sigkill", "before_store", "during_restore"],
    }
}

/// The names verify gives everything it creates.
struct Names {
    id: String,
    job: String,
    topic: String,
    table: String,
    dead_table: String,
    dead_topic: Option<String>,
    work: PathBuf,
}

fn names(user: &JobConfig, opts: &Options) -> Names {
    let id = format!("{:08x}", fastrand::u32(..));
    let kind = user.sink.kind();
    let table = match kind {
        SinkKind::Kafka => format!("sluice-verify-{id}-out"),
        SinkKind::Redis | SinkKind::Files => format!("verify_{id}"),
        _ => target::beside(&user.sink.table, &target::verify_name(&user.sink.table, &id)),
    };
    let dead_table = match kind {
        SinkKind::Files => format!("verify_{id}_dead"),
        _ => target::beside(
            &user.dead_letter.table,
            &target::verify_name(&user.dead_letter.table, &id),
        ),
    };
    let dead_topic = (user.dead_letter.kind == DeadLetterKind::Kafka || user.dead_letter.topic.is_some())
        .then(|| format!("sluice-verify-{id}-dead"));
    Names {
        job: format!("{}-verify-{id}", user.job.name),
        topic: opts.topic.clone().unwrap_or_else(|| format!("sluice-verify-{id}")),
        table,
        dead_table,
        dead_topic,
        work: std::env::temp_dir().join(format!("sluice-verify-{id}")),
        id,
    }
}

/// The embedded cluster (librdkafka's mock) for a job on `bootstrap_servers =
/// "embedded"`: verify owns it, and the job connects to it over loopback.
struct Embedded {
    bootstrap: String,
    _stop: std::sync::mpsc::Sender<()>,
}

fn start_embedded(topics: Vec<(String, i32)>) -> Result<Embedded> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let cluster = match rdkafka::mocking::MockCluster::new(1) {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Err(format!("starting the embedded cluster: {e}")));
                return;
            }
        };
        for (t, p) in &topics {
            if let Err(e) = cluster.create_topic(t, *p, 1) {
                let _ = tx.send(Err(format!("creating {t} on the embedded cluster: {e}")));
                return;
            }
        }
        let _ = tx.send(Ok(cluster.bootstrap_servers()));
        // The cluster lives until verify drops its handle.
        let _ = stopped.recv();
    });
    match rx.recv() {
        Ok(Ok(bootstrap)) => Ok(Embedded { bootstrap, _stop: stop }),
        Ok(Err(e)) => Err(Error::Internal(format!("verify: {e}"))),
        Err(_) => Err(Error::Internal("verify: the embedded cluster did not start".into())),
    }
}

/// The environment key of `sink.table`: a Kafka sink's file may name it `topic`, and
/// the override must be the name the file uses (both would be a duplicate).
fn table_key(file: &std::path::Path) -> &'static str {
    let uses_topic = config::Config::builder()
        .add_source(config::File::from(file).format(config::FileFormat::Toml))
        .build()
        .is_ok_and(|c| c.get_string("sink.topic").is_ok());
    match uses_topic {
        true => "SLUICE__SINK__TOPIC",
        false => "SLUICE__SINK__TABLE",
    }
}

/// The overrides that point a copy of the job at what verify created.
fn overrides(user: &JobConfig, n: &Names, bootstrap: Option<&str>, api_port: u16) -> Result<Vec<(String, String)>> {
    if user.checkpoint.from_savepoint.is_some() || !user.checkpoint.with_savepoints.is_empty() {
        return Err(Error::Unsupported(
            "the job restores a savepoint at start (checkpoint.from_savepoint): verify starts a job of its own from \
             nothing; verify a copy without it"
                .into(),
        ));
    }
    if !user.source.start_offsets.is_empty() {
        return Err(Error::Unsupported(
            "the job names source.start_offsets for its own topics; verify a copy without them".into(),
        ));
    }
    let mut o: Vec<(&str, String)> = vec![
        ("SLUICE__JOB__NAME", n.job.clone()),
        ("SLUICE__SOURCE__TOPICS", n.topic.clone()),
        ("SLUICE__SOURCE__START_FROM", "earliest".into()),
        (table_key(&user.file), n.table.clone()),
        ("SLUICE__DEAD_LETTER__TABLE", n.dead_table.clone()),
        ("SLUICE__METRICS__LISTEN", format!("127.0.0.1:{api_port}")),
        ("SLUICE__METRICS__PROBE_LISTEN", String::new()),
        ("SLUICE__CLUSTER__INSTANCES", "1".into()),
        ("SLUICE__STATE__DIR", n.work.join("state").display().to_string()),
        (
            "SLUICE__CHECKPOINT__SAVEPOINT_DIR",
            n.work.join("savepoints").display().to_string(),
        ),
    ];
    if user.sink.sql().is_some() {
        // The job's migrations made the job's tables; verify copies their structure.
        o.push(("SLUICE__SINK__RUN_MIGRATIONS", "false".into()));
    }
    match user.checkpoint.storage {
        StorageKind::Filesystem => o.push((
            "SLUICE__CHECKPOINT__DIR",
            n.work.join("checkpoints").display().to_string(),
        )),
        StorageKind::S3 => {
            let url = user.checkpoint.url.clone().unwrap_or_default();
            o.push((
                "SLUICE__CHECKPOINT__URL",
                format!("{}/sluice-verify-{}", url.trim_end_matches('/'), n.id),
            ));
        }
        StorageKind::Memory => {}
    }
    if let Some(t) = &n.dead_topic {
        o.push(("SLUICE__DEAD_LETTER__TOPIC", t.clone()));
    }
    if let Some(b) = bootstrap {
        o.push(("SLUICE__SOURCE__BOOTSTRAP_SERVERS", b.to_string()));
    }
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| !o.iter().any(|(name, _)| k.eq_ignore_ascii_case(name)))
        .collect();
    env.extend(o.into_iter().map(|(k, v)| (k.to_string(), v)));
    Ok(env)
}

/// Run the verification. An `Err` is verify's own failure to run (a refusal, an
/// unreachable system); a run that found faults returns a report that did not pass.
pub async fn run(opts: &Options) -> Result<Report> {
    let started = Instant::now();
    if let Some(bad) = opts
        .at
        .iter()
        .find(|p| *p != "sigkill" && !crate::failpoint::POINTS.contains(&p.as_str()))
    {
        return Err(Error::Unsupported(format!(
            "--at {bad}: a kill lands at `sigkill` or one of the failpoints {}",
            crate::failpoint::POINTS.join(", ")
        )));
    }
    let user = crate::config::load(&opts.config)?;
    shape::of(&user)?;
    let n = names(&user, opts);
    std::fs::create_dir_all(&n.work)
        .map_err(|e| Error::Internal(format!("verify: its work directory {}: {e}", n.work.display())))?;
    let partitions = (user.source.parallelism as i32).max(4);
    let embedded = match user.source.bootstrap_servers.as_str() {
        "embedded" => {
            let mut topics = vec![(n.topic.clone(), partitions)];
            topics.extend(n.dead_topic.iter().map(|t| (t.clone(), 1)));
            Some(start_embedded(topics)?)
        }
        _ => None,
    };
    let api_port = child::free_port()?;
    let env = overrides(&user, &n, embedded.as_ref().map(|e| e.bootstrap.as_str()), api_port)?;
    let cfg = crate::config::load_with_env(&opts.config, &env)?;
    let job = shape::of(&cfg)?;
    let cluster = Cluster {
        bootstrap: cfg.source.bootstrap_servers.clone(),
        properties: crate::config::flatten_properties_of(&cfg),
    };
    let mut report = Report {
        job: n.job.clone(),
        target: cfg.sink.kind().name().into(),
        strategy: cfg.sink.strategy.name().into(),
        claims_exactly_once: cfg.sink.strategy != Strategy::AtLeastOnce,
        check: match job.shape {
            Shape::PassThrough(_) => "pass_through".into(),
            Shape::Windowed(_) => "windows".into(),
        },
        topic: n.topic.clone(),
        table: n.table.clone(),
        kept: opts.keep,
        log: n.work.join("job.log").display().to_string(),
        ..Report::default()
    };
    if embedded.is_none() {
        cluster.create_fresh(&n.topic, partitions).await?;
    }
    let mut created_topics = vec![n.topic.clone()];
    // The producer tasks: stopped before the topic is deleted, or their records would
    // make the broker create it again.
    let feeders = std::sync::Mutex::new(Vec::<tokio::task::AbortHandle>::new());
    let outcome = async {
        // A job that makes its own tables at start (sink.run_migrations) may not have run
        // yet: its migrations are what `sluice run` would apply first. Verify's copies are
        // then made of the tables they define.
        if let Some(dir) = user
            .sink
            .sql()
            .filter(|s| s.run_migrations)
            .and_then(|s| s.migrations.clone())
        {
            if let Some(migrate) = crate::sink::target::target_kind(user.sink.kind())?.migrate {
                migrate(&crate::app::sink_context(&user), &dir).await?;
                report.notes.push(format!(
                    "applied the job's own migrations ({}) first, as `sluice run` would",
                    dir.display()
                ));
            }
        }
        let like = &user.sink.table;
        let like_dead = &user.dead_letter.table;
        target::create(&cfg, like, like_dead, &cluster, embedded.is_some()).await?;
        created_topics.extend(n.dead_topic.iter().cloned());
        // An operator's Ctrl-C (or a SIGTERM) ends the run, not the cleanup: the job is
        // killed with its future, and what verify made is removed below.
        tokio::select! {
            r = exercise(opts, &cfg, &job, &n, &env, &cluster, partitions, &mut report, &feeders) => r,
            () = interrupted() => Err(Error::Unsupported(
                "interrupted (Ctrl-C or SIGTERM): the job was stopped and what verify made is removed".into(),
            )),
        }
    }
    .await;
    for f in feeders
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .drain(..)
    {
        f.abort();
    }
    // Aborted tasks drop their producers (which purge what they queued) at their next
    // await point.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Err(e) = &outcome {
        report.problems.push(format!("verify could not finish: {e}"));
    }
    if !opts.keep {
        // The job's log outlives a failed verification: it is where to look next.
        if outcome.is_err() || !report.passed {
            let kept = std::env::temp_dir().join(format!("sluice-verify-{}.log", n.id));
            if std::fs::copy(n.work.join("job.log"), &kept).is_ok() {
                report.log = kept.display().to_string();
                report.notes.push(format!("the job's log is kept in {}", report.log));
            }
        }
        report.cleanup_failed = target::remove(&cfg, &cluster).await;
        if embedded.is_none() {
            if let Err(e) = cluster.delete(&created_topics).await {
                report.cleanup_failed.push(e.to_string());
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&n.work) {
            report.cleanup_failed.push(format!("{}: {e}", n.work.display()));
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    outcome.map(|()| report)
}

/// Produce, crash, restart, catch up, compare: the body of a verification.
#[allow(clippy::too_many_arguments)]
async fn exercise(
    opts: &Options,
    cfg: &JobConfig,
    job: &Job,
    n: &Names,
    env: &[(String, String)],
    cluster: &Cluster,
    partitions: i32,
    report: &mut Report,
    feeders: &std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
) -> Result<()> {
    let seed = opts.seed.unwrap_or_else(|| fastrand::u64(..));
    report
        .notes
        .push(format!("input seed {seed} (--seed repeats this input)"));
    let out_of_orderness = job.out_of_orderness;
    let step = input::step_ms(job, opts.records);
    let span = step * opts.records as i64 + out_of_orderness;
    let plan = input::Plan {
        records: opts.records,
        partitions,
        seed,
        // In the past, so no record is refused as too far in the future.
        base_ts: crate::clock::wall_clock_ms() - span - 3_600_000,
    };
    let dims = match &job.enrich {
        Some(e) => {
            let key_type = job
                .decoded
                .iter()
                .find(|(n, _)| *n == e.key)
                .map_or(crate::record::FieldType::String, |(_, t)| *t);
            dimension::rows(e, key_type).await?
        }
        None => Vec::new(),
    };
    let input = input::generate(job, &plan, &dims);
    let unknown = input.main.iter().filter(|r| r.kind == Kind::Unknown).count();
    if unknown > 0 {
        report.notes.push(format!(
            "{unknown} records look up keys no store holds (dead letters, as the job is set up)"
        ));
    }
    report.records = opts.records;
    report.bad_records = input.main.iter().filter(|r| r.kind == Kind::Bad).count() as u64;
    report.late_records = input.late.len() as u64;
    let producer = cluster.producer()?;
    let log = n.work.join("job.log");
    let config = opts.config.clone();
    let api = env
        .iter()
        .find(|(k, _)| k == "SLUICE__METRICS__LISTEN")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();

    // Positions of what was produced: (partition, offset) per record, and each
    // partition's end.
    let mut placed: Vec<(Rec, i32, i64)> = Vec::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let slices = opts.kills + 1;
    let per = input.main.len().div_ceil(slices).max(1);
    let mut chunks = input.main.chunks(per);
    let memory = cfg.checkpoint.storage == StorageKind::Memory;
    let points: Vec<&str> = match opts.at.is_empty() {
        // Checkpoints in memory die with the process: a restart begins anew, with no
        // restore to crash in.
        true => kill_points(cfg.sink.strategy)
            .iter()
            .copied()
            .filter(|p| !(memory && *p == "during_restore"))
            .collect(),
        false => opts.at.iter().map(String::as_str).collect(),
    };
    if memory {
        report.notes.push(
            "checkpoints are kept in memory (checkpoint.storage): each restart reads the input anew, and an \
             idempotent target must end the same"
                .into(),
        );
    }
    let mut max_checkpoint = 0u64;
    let interval = cfg.checkpoint.interval;
    // A slice is fed over about a run's life (a start, then a few checkpoints), one slice
    // after the other whatever the kills do: records keep arriving through crashes and
    // restarts, and in event-time order.
    let pause = ((Duration::from_secs(2) + interval * 3) / FEED_BATCHES as u32)
        .clamp(Duration::from_millis(20), Duration::from_secs(3));
    let mut feeding: Feeding = tokio::spawn(async { Ok(Vec::new()) });

    for k in 0..opts.kills {
        let slice: Vec<Rec> = chunks.next().map(<[Rec]>::to_vec).unwrap_or_default();
        let point = points[k % points.len()];
        let from = match (point, cfg.checkpoint.storage) {
            ("during_restore", _) => 1,
            (_, StorageKind::Memory) => 2,
            _ => max_checkpoint + 2,
        };
        let failpoint = (point != "sigkill").then(|| format!("{point}:{from}"));
        feeding = chain(feeding, producer.clone(), n.topic.clone(), slice, pause);
        feeders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(feeding.abort_handle());
        let run_started = Instant::now();
        let fired_before = fired(&log, point);
        let mut child = Child::start(&config, env, failpoint.as_deref(), &log, &api)?;
        let mut last_status = None;
        let reached = match point {
            "sigkill" => {
                // Once records flow, at a random moment within a checkpoint interval.
                last_status = child::poll(Duration::from_secs(60), || async {
                    let s = child.status().await?;
                    (child::figure(&s, "records_in") > 0).then_some(s)
                })
                .await;
                let wait = fastrand::u64(100..interval.as_millis().clamp(200, 5_000) as u64);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if let Some(s) = child.status().await {
                    last_status = Some(s);
                }
                if let Some(st) = child.exited() {
                    return Err(job_died(&log, st));
                }
                child.kill9().await;
                true
            }
            _ => {
                let deadline = Instant::now() + Duration::from_secs(45) + interval * 4;
                loop {
                    if let Some(st) = child.exited() {
                        if fired(&log, point) <= fired_before {
                            return Err(job_died(&log, st));
                        }
                        break true;
                    }
                    if Instant::now() > deadline {
                        child.kill9().await;
                        break false;
                    }
                    if let Some(s) = child.status().await {
                        last_status = Some(s);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let checkpoint = last_status.as_ref().and_then(child::last_checkpoint);
        max_checkpoint = max_checkpoint.max(checkpoint.unwrap_or(0));
        report.checkpoints += last_status
            .as_ref()
            .map_or(0, |s| child::figure(s, "checkpoints_completed"));
        report.kills.push(Kill {
            run: k + 1,
            point: point.to_string(),
            reached,
            after_ms: run_started.elapsed().as_millis() as u64,
            checkpoint,
        });
    }

    // The last run: the rest of the input, then (windows) the late and flush records
    // once it caught up, then until the target is right or the time is up.
    let rest: Vec<Rec> = chunks.flat_map(<[Rec]>::to_vec).collect();
    let feeding = chain(feeding, producer.clone(), n.topic.clone(), rest, pause);
    feeders
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(feeding.abort_handle());
    let mut child = Child::start(&config, env, None, &log, &api)?;
    report.restarts = opts.kills as u64;
    let fed = feeding
        .await
        .map_err(|e| Error::Internal(format!("verify: the producer task: {e}")))??;
    for (r, (p, o)) in fed {
        let end = ends.entry(p).or_insert(0);
        *end = (*end).max(o + 1);
        placed.push((r, p, o));
    }
    let deadline = Instant::now() + opts.timeout;
    let caught_up = |ends: HashMap<i32, i64>| {
        let child = &child;
        let topic = n.topic.clone();
        async move {
            let s = child.status().await?;
            let pos: HashMap<String, i64> = child::positions(&s).into_iter().collect();
            ends.iter()
                .all(|(p, end)| pos.get(&format!("{topic}/{p}")).is_some_and(|at| at >= end))
                .then_some(())
        }
    };
    if !input.late.is_empty() || !input.flush.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if child::poll(remaining, || caught_up(ends.clone())).await.is_none() {
            report
                .problems
                .push("the job did not catch up with the input before the timeout".to_string());
        }
        // The watermark of what was read reaches the window operator before the late
        // records do.
        tokio::time::sleep(cfg.time.watermark_interval * 3 + Duration::from_millis(500)).await;
        for batch in [input.late.clone(), input.flush.clone()] {
            let fed = feed(producer.clone(), n.topic.clone(), batch, Duration::ZERO).await?;
            for (r, (p, o)) in fed {
                let end = ends.entry(p).or_insert(0);
                *end = (*end).max(o + 1);
                placed.push((r, p, o));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            child::poll(remaining, || caught_up(ends.clone())).await;
            tokio::time::sleep(cfg.time.watermark_interval * 3 + Duration::from_millis(500)).await;
        }
    }
    if let Some(st) = child.exited() {
        return Err(job_died(&log, st));
    }
    // Until the target holds everything (or the time is up); then a clean stop and the
    // final reading.
    let mut failures = 0;
    loop {
        let mut probe = Report::default();
        let done = match compare(cfg, job, &input, &placed, cluster, &mut probe).await {
            Ok(()) => {
                probe.judge();
                probe.missing.count == 0
                    && probe.dead_letters.missing.count == 0
                    && probe
                        .windows
                        .as_ref()
                        .is_none_or(|w| w.missing_count == 0 && w.wrong_count == 0)
            }
            // Reading may fail while the job writes (a locked SQLite file); not for long.
            Err(e) if failures >= 5 => return Err(e),
            Err(_) => {
                failures += 1;
                false
            }
        };
        if done || Instant::now() > deadline {
            break;
        }
        if let Some(st) = child.exited() {
            return Err(job_died(&log, st));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if let Some(s) = child.status().await {
        report.checkpoints += child::figure(&s, "checkpoints_completed");
    }
    report.clean_stop = child.terminate(Duration::from_secs(60)).await;
    compare(cfg, job, &input, &placed, cluster, report).await?;
    report.open_transactions = target::open_transactions(cfg).await?;
    report.judge();
    Ok(())
}

/// A Ctrl-C or a SIGTERM to verify itself.
async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// How often the job's log says failpoint `point` fired.
fn fired(log: &PathBuf, point: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(&format!("failpoint {point} at checkpoint"))
        .count()
}

fn job_died(log: &PathBuf, status: std::process::ExitStatus) -> Error {
    Error::Unsupported(format!(
        "the job exited ({status}) on its own, not at a planned crash; the end of its log:\n{}",
        child::log_tail(log, 25)
    ))
}

/// Batches a slice of the input is fed in.
const FEED_BATCHES: usize = 20;

/// The input fed so far, with each record's (partition, offset).
type Feeding = tokio::task::JoinHandle<Result<Vec<(Rec, (i32, i64))>>>;

/// Feed `records` once `before` has fed its own.
fn chain(
    before: Feeding,
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    records: Vec<Rec>,
    pause: Duration,
) -> Feeding {
    tokio::spawn(async move {
        let mut fed = before
            .await
            .map_err(|e| Error::Internal(format!("verify: the producer task: {e}")))??;
        fed.extend(feed(producer, topic, records, pause).await?);
        Ok(fed)
    })
}

/// Produce `records` in small batches with pauses, so that they keep arriving while a
/// run lives; each record with its (partition, offset).
async fn feed(
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    records: Vec<Rec>,
    pause: Duration,
) -> Result<Vec<(Rec, (i32, i64))>> {
    let mut out = Vec::with_capacity(records.len());
    for batch in records.chunks(records.len().div_ceil(FEED_BATCHES).max(10)) {
        let send: Vec<(String, Vec<u8>, Option<i32>)> = batch
            .iter()
            .map(|r| (r.key.clone(), r.payload.clone(), r.partition))
            .collect();
        let placed = kafka::produce(&producer, &topic, &send).await?;
        out.extend(batch.iter().cloned().zip(placed));
        tokio::time::sleep(pause).await;
    }
    Ok(out)
}

/// Read the target and compare it with what the input must give, into `report`.
async fn compare(
    cfg: &JobConfig,
    job: &Job,
    input: &Input,
    placed: &[(Rec, i32, i64)],
    cluster: &Cluster,
    report: &mut Report,
) -> Result<()> {
    let rows = target::rows(cfg, cluster).await?;
    report.rows = rows.len() as u64;
    match &job.shape {
        Shape::PassThrough(p) => {
            let by_origin: HashMap<(i64, i64), u64> = placed.iter().map(|(r, p, o)| ((*p as i64, *o), r.seq)).collect();
            pass_through(p, input, &rows, &by_origin, report)
        }
        Shape::Windowed(w) => report.windows = Some(windows(w, input, &rows)),
    }
    // Dead letters: every bad and late record once, no good record.
    let expected: HashSet<(i64, i64)> = placed
        .iter()
        .filter(|(r, _, _)| matches!(r.kind, Kind::Bad | Kind::Late | Kind::Unknown))
        .map(|(_, p, o)| (*p as i64, *o))
        .collect();
    let good: HashMap<(i64, i64), u64> = placed
        .iter()
        .filter(|(r, _, _)| r.kind == Kind::Good)
        .map(|(r, p, o)| ((*p as i64, *o), r.seq))
        .collect();
    let found = target::dead_letters(cfg, cluster).await?;
    let mut seen: HashMap<(i64, i64), u64> = HashMap::new();
    for d in &found {
        *seen.entry((d.partition, d.offset)).or_default() += 1;
    }
    let d = &mut report.dead_letters;
    *d = report::DeadLetters {
        expected: expected.len() as u64,
        found: seen.keys().filter(|k| expected.contains(k)).count() as u64,
        repeated: seen.values().filter(|n| **n > 1).count() as u64,
        ..Default::default()
    };
    let mut missing: Vec<&(i64, i64)> = expected.iter().filter(|k| !seen.contains_key(k)).collect();
    missing.sort();
    for (p, o) in missing {
        d.missing.add(format!("{p}/{o}"));
    }
    let mut wrongly: Vec<u64> = seen.keys().filter_map(|k| good.get(k).copied()).collect();
    wrongly.sort_unstable();
    for seq in wrongly {
        d.unexpected.add(seq);
    }
    Ok(())
}

/// The sequence number a row carries.
fn seq_of(row: &Map<String, Value>, carrier: &shape::Carrier, by_origin: &HashMap<(i64, i64), u64>) -> Option<u64> {
    let int = |v: &Value| match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.strip_prefix("seq-").unwrap_or(s).parse().ok(),
        _ => None,
    };
    match carrier {
        shape::Carrier::Field { column, .. } => int(row.get(column)?).and_then(|n| u64::try_from(n).ok()),
        shape::Carrier::Origin { partition, offset } => by_origin
            .get(&(int(row.get(partition)?)?, int(row.get(offset)?)?))
            .copied(),
    }
}

fn pass_through(
    p: &shape::PassThrough,
    input: &Input,
    rows: &[Map<String, Value>],
    by_origin: &HashMap<(i64, i64), u64>,
    report: &mut Report,
) {
    let records: BTreeMap<u64, &Rec> = input
        .main
        .iter()
        .filter(|r| r.kind == Kind::Good)
        .map(|r| (r.seq, r))
        .collect();
    let mut counts: BTreeMap<u64, u64> = BTreeMap::new();
    report.missing = Default::default();
    report.duplicated = Default::default();
    report.corrupted = Default::default();
    report.unexpected = Default::default();
    for row in rows {
        match seq_of(row, &p.carrier, by_origin).filter(|s| records.contains_key(s)) {
            Some(seq) => {
                *counts.entry(seq).or_default() += 1;
                let rec = records[&seq];
                let differs = p.columns.iter().any(|(column, field)| {
                    let (Some(want), Some(got)) = (rec.fields.get(field), row.get(column)) else {
                        return false;
                    };
                    !same_value(want, got)
                });
                if differs && report.corrupted.count < u64::MAX {
                    report.corrupted.add(seq);
                }
            }
            None => report.unexpected.add(Value::Object(row.clone())),
        }
    }
    for seq in records.keys() {
        match counts.get(seq).copied().unwrap_or(0) {
            0 => report.missing.add(seq),
            1 => {}
            n => report.duplicated.add(format!("{seq}×{n}")),
        }
    }
}

/// A field's value as produced against a column's as read back.
fn same_value(want: &Value, got: &Value) -> bool {
    match (want, got) {
        // JSON fields: a text column holds the JSON text.
        (Value::Object(_) | Value::Array(_), Value::String(s)) => {
            serde_json::from_str::<Value>(s).is_ok_and(|v| &v == want)
        }
        _ => reference::same(want, got),
    }
}

fn windows(w: &shape::Windowed, input: &Input, rows: &[Map<String, Value>]) -> Windows {
    let mut all: Vec<Rec> = input.main.clone();
    all.extend(input.late.iter().cloned());
    let expected = reference::compute(w, &all);
    let last_ts = input.span.1;
    // (key, start) → the rows of that window.
    let mut got: BTreeMap<(String, i64), Vec<&Map<String, Value>>> = BTreeMap::new();
    let mut unexpected = 0;
    for row in rows {
        let keys: Vec<&Value> = w
            .key_columns
            .iter()
            .map(|c| row.get(c).unwrap_or(&Value::Null))
            .collect();
        let Some(start) = row
            .get(&w.start_column)
            .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
        else {
            unexpected += 1;
            continue;
        };
        // The flush records' windows, after every good record's.
        if start > last_ts {
            continue;
        }
        got.entry((reference::key_text(&keys), start)).or_default().push(row);
    }
    let mut out = Windows {
        expected: expected.len() as u64,
        ..Windows::default()
    };
    let firing = |r: &Map<String, Value>| -> String {
        w.firing_column
            .as_ref()
            .and_then(|c| r.get(c))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    for ((key, start), (_, values)) in &expected {
        let want: Map<String, Value> = w
            .aggregates
            .iter()
            .zip(values)
            .map(|(a, v)| (a.column.clone(), v.clone()))
            .collect();
        let diff = |got: Option<&Map<String, Value>>| WindowDiff {
            key: key.clone(),
            window_start: *start,
            expected: Some(want.clone()),
            got: got.cloned(),
        };
        let Some(rows) = got.remove(&(key.clone(), *start)) else {
            out.missing_count += 1;
            if out.missing.len() < 20 {
                out.missing.push(diff(None));
            }
            continue;
        };
        let matches = |r: &Map<String, Value>| {
            w.aggregates
                .iter()
                .zip(values)
                .all(|(a, v)| r.get(&a.column).is_some_and(|g| reference::same(v, g)))
        };
        // The final firing decides: an upsert keeps one row; an append target keeps
        // every firing, and the last of them (late, else on time) must be right.
        let finals: Vec<&&Map<String, Value>> = match w.upsert {
            true => rows.iter().collect(),
            false => {
                let late: Vec<_> = rows.iter().filter(|r| firing(r) == "late").collect();
                match late.is_empty() {
                    false => late,
                    true => rows.iter().filter(|r| firing(r) != "early").collect(),
                }
            }
        };
        if !w.upsert && w.firing_column.is_some() {
            let on_time = rows.iter().filter(|r| firing(r) == "on_time").count();
            if on_time > 1 {
                out.fired_twice_count += 1;
                if out.fired_twice.len() < 20 {
                    out.fired_twice.push(diff(rows.first().copied()));
                }
            }
        }
        if finals.iter().any(|r| matches(r)) {
            out.matched += 1;
        } else {
            out.wrong_count += 1;
            if out.wrong.len() < 20 {
                out.wrong
                    .push(diff(finals.first().map(|r| **r).or(rows.first().copied())));
            }
        }
    }
    out.unexpected = unexpected + got.values().map(|v| v.len() as u64).sum::<u64>();
    out
}
