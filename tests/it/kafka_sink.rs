//! Kafka → sluice → Kafka with `two_phase` (Kafka transactions): SIGKILLs at random
//! moments and a crash between "checkpoint complete" and the commit leave every input
//! record exactly once in what a `read_committed` consumer sees; a `read_uncommitted`
//! consumer shows that aborted data existed (so transactions were really used).

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::common::*;

/// Every message value of `topic` (all partitions, from the start) as seen with `isolation`.
fn consume_all(topic: &str, partitions: i32, isolation: &str) -> Vec<serde_json::Value> {
    consume_keyed(topic, partitions, isolation)
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// A consumer of every partition of `topic` from the start, reporting each end.
fn reader(topic: &str, partitions: i32, isolation: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("reader"))
        .set("isolation.level", isolation)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}

/// Every message of `topic` (all partitions, from the start, until each ends), as
/// seen with `isolation`, through `each`.
fn read_all(
    topic: &str,
    partitions: i32,
    isolation: &str,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) {
    let consumer = reader(topic, partitions, isolation);
    let mut ended = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ended.len() < partitions as usize && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => each(&m),
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ended.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
}

/// Every message of `topic` as (key, JSON value), as seen with `isolation`.
fn consume_keyed(topic: &str, partitions: i32, isolation: &str) -> Vec<(Option<String>, serde_json::Value)> {
    let mut out = Vec::new();
    read_all(topic, partitions, isolation, |m| {
        if let Some(v) = m.payload().and_then(|p| serde_json::from_slice(p).ok()) {
            out.push((m.key().map(|k| String::from_utf8_lossy(k).into_owned()), v));
        }
    });
    out
}

/// The ids in what `read_committed` sees of `topic`.
fn committed_ids(topic: &str, partitions: i32) -> Vec<i64> {
    consume_all(topic, partitions, "read_committed")
        .iter()
        .filter_map(|v| v["id"].as_i64())
        .collect()
}

struct KafkaJob {
    input: String,
    output: String,
    dlq: String,
    job: String,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn kafka_job(prefix: &str, interval: &str) -> KafkaJob {
    let (input, output, dlq, job) = (unique(prefix), unique("out"), unique("dlq"), unique(prefix));
    create_topic(&input, 3).await;
    create_topic(&output, 2).await;
    create_topic(&dlq, 1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        r#"
[job]
name = "{job}"
status_interval = "0s"

[source]
bootstrap_servers = "{kafka}"
topics = ["{input}"]
parallelism = 2

[[decode.fields]]
name = "id"
type = "int"

[[decode.fields]]
name = "body"
type = "string"

[checkpoint]
interval = "{interval}"
timeout = "20s"
storage = "filesystem"
dir = "{cp}"

[restart]
strategy = "fixed_delay"
attempts = 100
delay = "500ms"

[sink]
kind = "kafka"
url = "{kafka}"
topic = "{output}"
strategy = "two_phase"
parallelism = 2

[dead_letter]
kind = "kafka"
topic = "{dlq}"

[metrics]
listen = ""
"#,
        kafka = kafka(),
        cp = dir.path().join("cp").display(),
    );
    let config = write_config(dir.path(), &toml);
    KafkaJob {
        input,
        output,
        dlq,
        job,
        log: dir.path().join("sluice.log"),
        config,
        _dir: dir,
    }
}

/// Start once more, wait until `total` distinct ids are committed, stop, and check:
/// every id exactly once, read committed.
async fn finish(j: &KafkaJob, total: i64) {
    let s = Sluice::start(&j.config, &j.log);
    let (out, n) = (j.output.clone(), total);
    let done = wait_until(Duration::from_secs(120), || {
        let out = out.clone();
        async move {
            tokio::task::spawn_blocking(move || committed_ids(&out, 2).len() as i64 >= n)
                .await
                .unwrap_or(false)
        }
    })
    .await;
    assert!(done, "not every record arrived: {}", s.log_tail());
    assert!(s.terminate().success());
    assert_each_once(j, total).await;
}

/// The committed output of `j` holds every id of `0..total` once.
async fn assert_each_once(j: &KafkaJob, total: i64) {
    let out = j.output.clone();
    let mut ids = tokio::task::spawn_blocking(move || committed_ids(&out, 2))
        .await
        .expect("read");
    ids.sort_unstable();
    let len = ids.len();
    ids.dedup();
    assert_eq!(
        len,
        ids.len(),
        "records doubled in the committed output; log:\n{}",
        log_without(&j.log, "reading partition")
    );
    assert_eq!(ids, (0..total).collect::<Vec<_>>(), "records lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_to_kafka_two_phase_killed_repeatedly_is_exactly_once() {
    let j = kafka_job("k2k_kill", "500ms").await;
    const TOTAL: u64 = 30_000;
    let input = j.input.clone();
    let feeder = std::thread::spawn(move || {
        for part in 0..15 {
            produce(&input, (part * 2_000..(part + 1) * 2_000).map(record));
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    for _ in 0..5 {
        let s = Sluice::start(&j.config, &j.log);
        let wait = rand::rng().random_range(1_500..3_500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        s.kill9();
    }
    feeder.join().expect("feeder");
    finish(&j, TOTAL as i64).await;
    let out = j.output.clone();
    let all = tokio::task::spawn_blocking(move || consume_all(&out, 2, "read_uncommitted"))
        .await
        .expect("read");
    // Every transaction leaves a control record (its commit or abort marker) in each
    // partition it wrote, taking an offset no consumer sees: without transactions the
    // log would end exactly after its messages. (Aborted data is not a proof: kills
    // may all land while no transaction holds records.)
    let out = j.output.clone();
    let end: i64 = tokio::task::spawn_blocking(move || high_watermarks(&out, 2).iter().sum())
        .await
        .expect("watermarks");
    assert!(all.len() as u64 >= TOTAL);
    assert!(
        end > all.len() as i64,
        "the output log ends at {end} offsets for {} messages: no transaction markers, were transactions used?",
        all.len()
    );
}

/// The end offset of every partition of `topic`.
fn high_watermarks(topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .expect("consumer");
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect()
}

/// A crash after checkpoint n completed and before its transaction committed: the
/// restart finds epoch n uncommitted in the commit topic and writes it again, once.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_checkpoint_complete_and_commit_rewrites_the_epoch_once() {
    let j = kafka_job("k2k_fp", "500ms").await;
    produce(&j.input, (0..5_000).map(record));
    let mut s = Sluice::start_with(&j.config, &j.log, &[("SLUICE_FAILPOINT", "before_commit:1")]);
    let exit = s.wait_exit(Duration::from_secs(60));
    assert!(
        exit.is_some_and(|e| !e.success()),
        "the failpoint was not hit: {}",
        s.log_tail()
    );
    // `sluice txn` shows the epoch waiting and refuses to commit from outside.
    let txn = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("txn")
            .args(args)
            .arg("--config")
            .arg(&j.config)
            .output()
            .expect("run sluice txn");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, listed) = txn(&["list"]);
    assert!(ok && listed.contains("not committed"), "{listed}");
    let (ok, said) = txn(&["commit", "--all"]);
    assert!(!ok && said.contains("cannot be committed from outside"), "{said}");
    let (ok, said) = txn(&["abort", "--all"]);
    assert!(
        ok && said.contains("aborted the open transactions of 6 transactional ids"),
        "{said}"
    );
    produce(&j.input, (5_000..8_000).map(record));
    finish(&j, 8_000).await;
    let log = std::fs::read_to_string(&j.log).unwrap_or_default();
    assert!(log.contains("failpoint before_commit"), "{log}");
    assert!(log.contains("rewrote an epoch whose commit was lost"), "{log}");
}

/// Bad records go to the dead-letter topic inside the same transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_to_their_topic_exactly_once() {
    let j = kafka_job("k2k_dead", "500ms").await;
    let input: Vec<(String, Option<String>)> = (0..1_000u64)
        .map(|i| match i % 100 {
            7 => (i.to_string(), Some("not json".to_string())),
            _ => record(i),
        })
        .collect();
    produce(&j.input, input);
    let s = Sluice::start(&j.config, &j.log);
    let dlq = j.dlq.clone();
    let done = wait_until(Duration::from_secs(60), || {
        let dlq = dlq.clone();
        async move {
            tokio::task::spawn_blocking(move || consume_all(&dlq, 1, "read_committed").len() >= 10)
                .await
                .unwrap_or(false)
        }
    })
    .await;
    assert!(done, "{}", s.log_tail());
    assert!(s.terminate().success());
    let dlq = j.dlq.clone();
    let dead = tokio::task::spawn_blocking(move || consume_all(&dlq, 1, "read_committed"))
        .await
        .expect("read");
    assert_eq!(dead.len(), 10, "{dead:?}");
    assert!(dead.iter().all(|d| d["reason"].as_str().is_some_and(|r| !r.is_empty())));
    let out = j.output.clone();
    let ids = tokio::task::spawn_blocking(move || committed_ids(&out, 2))
        .await
        .expect("read");
    assert_eq!(ids.len(), 990);
}

/// Records whose messages are larger than the output topic takes (`max.message.bytes`
/// of 8 KiB): each is a dead letter in the same transaction, its payload cut to fit the
/// dead-letter topic (8 KiB too), and the rest is committed; the job never restarts. The
/// Kafka sink used to fail on MSG_SIZE_TOO_LARGE and restart forever, committing
/// nothing, its open transactions hiding other writers' commits from `read_committed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_topic_s_size_limit_are_dead_letters() {
    let j = kafka_job("k2k_big", "500ms").await;
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .expect("admin");
    for t in [&j.output, &j.dlq] {
        let cfg = rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(t))
            .set("max.message.bytes", "8192");
        for r in admin
            .alter_configs(&[cfg], &rdkafka::admin::AdminOptions::new())
            .await
            .expect("alter topic config")
        {
            r.expect("max.message.bytes set");
        }
    }
    let big = "x".repeat(20_000);
    let input: Vec<(String, Option<String>)> = (0..400u64)
        .map(|i| match i % 100 {
            42 => (i.to_string(), Some(format!(r#"{{"id": {i}, "body": "{big}"}}"#))),
            _ => record(i),
        })
        .collect();
    produce(&j.input, input);
    let s = Sluice::start(&j.config, &j.log);
    let (out, dlq) = (j.output.clone(), j.dlq.clone());
    let done = wait_until(Duration::from_secs(60), || {
        let (out, dlq) = (out.clone(), dlq.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                committed_ids(&out, 2).len() >= 396 && consume_all(&dlq, 1, "read_committed").len() >= 4
            })
            .await
            .unwrap_or(false)
        }
    })
    .await;
    assert!(done, "{}", s.log_tail());
    assert!(s.terminate().success());
    let text = std::fs::read_to_string(&j.log).unwrap_or_default();
    assert!(!text.contains("restarting"), "the job restarted: {text}");
    let dlq = j.dlq.clone();
    let dead = tokio::task::spawn_blocking(move || consume_all(&dlq, 1, "read_committed"))
        .await
        .expect("read");
    assert_eq!(dead.len(), 4, "{dead:?}");
    for d in &dead {
        let reason = d["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("more than the 8192") && reason.contains("payload cut"),
            "{reason}"
        );
    }
    let out = j.output.clone();
    let mut ids = tokio::task::spawn_blocking(move || committed_ids(&out, 2))
        .await
        .expect("read");
    ids.sort_unstable();
    let expected: Vec<i64> = (0..400).filter(|i| i % 100 != 42).collect();
    assert_eq!(ids, expected);
}

/// Where a `read_committed` reader of every partition of `topic` stops: the last
/// stable offset, below the end while a transaction is open.
#[cfg(feature = "failpoints")]
fn stable_ends(topic: &str, partitions: i32) -> Vec<i64> {
    let consumer = reader(topic, partitions, "read_committed");
    let mut ended = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while ended.len() < partitions as usize && std::time::Instant::now() < deadline {
        if let Some(Err(KafkaError::PartitionEOF(p))) = consumer.poll(Duration::from_millis(200)) {
            ended.insert(p);
        }
    }
    let positions = consumer.position().expect("position");
    (0..partitions)
        .map(|p| match positions.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        })
        .collect()
}

/// A Kafka `two_phase` job that gives up (restart strategy `none`, its commit failing)
/// aborts its open transactions before it exits: a `read_committed` reader of the
/// output reaches the end at once, instead of stopping before the open transaction
/// until the broker's transaction timeout (and with it every other writer's commits
/// to a shared topic).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_job_that_gives_up_leaves_no_transaction_open() {
    let j = kafka_job("k2k_giveup", "500ms").await;
    let toml = std::fs::read_to_string(&j.config).expect("config").replace(
        "strategy = \"fixed_delay\"\nattempts = 100\ndelay = \"500ms\"",
        "strategy = \"none\"",
    );
    std::fs::write(&j.config, toml).expect("config");
    let input = j.input.clone();
    let feeder = std::thread::spawn(move || {
        for part in 0..10 {
            produce(&input, (part * 500..(part + 1) * 500).map(record));
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut s = Sluice::start_with(&j.config, &j.log, &[("SLUICE_FAILPOINT", "fail_before_commit:3")]);
    let exit = s.wait_exit(Duration::from_secs(60));
    feeder.join().expect("producer");
    let log = std::fs::read_to_string(&j.log).unwrap_or_default();
    assert!(exit.is_some_and(|e| !e.success()), "the job did not give up: {log}");
    let out = j.output.clone();
    let (stable, high) = tokio::task::spawn_blocking(move || (stable_ends(&out, 2), high_watermarks(&out, 2)))
        .await
        .expect("read");
    assert!(high.iter().sum::<i64>() > 0, "nothing was written: {log}");
    assert_eq!(stable, high, "a transaction is still open in the output:\n{log}");
}

/// A checkpoint interval the brokers' transaction.max.timeout.ms cannot cover is refused
/// at start, with the numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_timeout_beyond_the_brokers_maximum_is_refused() {
    let j = kafka_job("k2k_timeout", "20m").await;
    let mut s = Sluice::start(&j.config, &j.log);
    let exit = s.wait_exit(Duration::from_secs(60));
    let log = std::fs::read_to_string(&j.log).unwrap_or_default();
    assert!(exit.is_some_and(|e| !e.success()), "{log}");
    assert!(log.contains("transaction.max.timeout.ms = 900000 ms"), "{log}");
    assert!(log.contains("1280000 ms"), "{log}");
    let _ = &j.job;
}

/// Two processes of one Kafka-sink job (separate checkpoint directories: the lock in a
/// shared one would stop the second): the newer initialises the transactional ids and
/// so fences the older, which stops naming the reason instead of restarting and fencing
/// back (a ping-pong in which both would keep committing now and then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_process_of_the_job_fences_the_older_which_stops() {
    let j = kafka_job("k2k_fence", "500ms").await;
    let input = j.input.clone();
    let feeder = std::thread::spawn(move || {
        for part in 0..20 {
            produce(&input, (part * 500..(part + 1) * 500).map(record));
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    let mut older = Sluice::start(&j.config, &j.log);
    let out = j.output.clone();
    let started = wait_until(Duration::from_secs(60), || {
        let out = out.clone();
        async move {
            tokio::task::spawn_blocking(move || !committed_ids(&out, 2).is_empty())
                .await
                .unwrap_or(false)
        }
    })
    .await;
    assert!(started, "{}", older.log_tail());
    let other = tempfile::tempdir().expect("tempdir");
    let toml = std::fs::read_to_string(&j.config).expect("config").replace(
        &j._dir.path().join("cp").display().to_string(),
        &other.path().join("cp").display().to_string(),
    );
    let newer_log = other.path().join("newer.log");
    let mut newer = Sluice::start_with(
        &write_config(other.path(), &toml),
        &newer_log,
        &[("SLUICE__SOURCE__FRESH_START", "true")],
    );
    let exit = older.wait_exit(Duration::from_secs(60));
    let said = std::fs::read_to_string(&j.log).unwrap_or_default();
    assert!(
        exit.is_some_and(|e| !e.success()),
        "the older process kept running: {said}"
    );
    assert!(said.contains("was fenced by a newer sluice process"), "{said}");
    assert!(
        newer.wait_exit(Duration::from_secs(5)).is_none(),
        "the newer process stopped: {}",
        std::fs::read_to_string(&newer_log).unwrap_or_default()
    );
    feeder.join().expect("feeder");
    let newer_said = std::fs::read_to_string(&newer_log).unwrap_or_default();
    assert!(
        !newer_said.contains("fenced"),
        "the newer one was fenced back: {newer_said}"
    );
    assert!(newer.terminate().success());
}

/// `idempotent` into Kafka, killed three times: nothing lost; replayed records come again
/// under the same key (the input's coordinates), so a compacted topic keeps each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_idempotent_loses_nothing_and_repeats_only_under_the_same_key() {
    let j = kafka_job("k2k_idem", "500ms").await;
    let toml = std::fs::read_to_string(&j.config)
        .expect("config")
        .replace("strategy = \"two_phase\"", "strategy = \"idempotent\"");
    std::fs::write(&j.config, toml).expect("config");
    const TOTAL: i64 = 12_000;
    let input = j.input.clone();
    let feeder = std::thread::spawn(move || {
        for part in 0..6 {
            produce(&input, (part * 2_000..(part + 1) * 2_000).map(record));
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    for _ in 0..3 {
        let s = Sluice::start(&j.config, &j.log);
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1_000..2_500))).await;
        s.kill9();
    }
    feeder.join().expect("feeder");
    let s = Sluice::start(&j.config, &j.log);
    let out = j.output.clone();
    let done = wait_until(Duration::from_secs(90), || {
        let out = out.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                committed_ids(&out, 2).into_iter().collect::<HashSet<_>>().len() as i64 >= TOTAL
            })
            .await
            .unwrap_or(false)
        }
    })
    .await;
    assert!(done, "{}", s.log_tail());
    assert!(s.terminate().success());
    let out = j.output.clone();
    let messages = tokio::task::spawn_blocking(move || consume_keyed(&out, 2, "read_uncommitted"))
        .await
        .expect("read");
    let mut by_key = std::collections::HashMap::new();
    for (key, m) in &messages {
        let key = key.clone().expect("every message has a key");
        let coordinates = format!(
            "{}/{}/{}",
            m["topic"].as_str().unwrap_or_default(),
            m["partition"],
            m["offset"]
        );
        assert_eq!(key, coordinates, "the key is the input record's coordinates");
        let id = m["id"].as_i64().expect("id");
        assert_eq!(*by_key.entry(key).or_insert(id), id, "one key, two records");
    }
    assert_eq!(by_key.len() as i64, TOTAL, "records lost");
}

/// Crashes before checkpoint n is complete (after the epoch's transaction is flushed;
/// after every acknowledgement but before the checkpoint is stored): the restart aborts
/// the open transactions by initialising their ids, and the epoch is replayed from the
/// source. Every record once, read committed.
#[cfg(feature = "failpoints")]
async fn crash_before_complete(point: &str) {
    let j = kafka_job("k2k_crash", "500ms").await;
    let input = j.input.clone();
    let feeder = std::thread::spawn(move || {
        for part in 0..10 {
            produce(&input, (part * 1_000..(part + 1) * 1_000).map(record));
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut s = Sluice::start_with(&j.config, &j.log, &[("SLUICE_FAILPOINT", &format!("{point}:3"))]);
    let exit = s.wait_exit(Duration::from_secs(60));
    assert!(
        exit.is_some_and(|e| !e.success()),
        "the failpoint was not hit: {}",
        s.log_tail()
    );
    feeder.join().expect("feeder");
    finish(&j, 10_000).await;
    let log = std::fs::read_to_string(&j.log).unwrap_or_default();
    assert!(log.contains(&format!("failpoint {point}")), "{log}");
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_crash_after_prepare() {
    crash_before_complete("after_prepare").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_crash_before_store() {
    crash_before_complete("before_store").await;
}

/// A crash right after an epoch's transaction committed, before the sink forgot it:
/// the restored checkpoint still lists the epoch, the commit topic shows it committed,
/// and it is not written again.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_crash_after_commit() {
    crash_before_complete("after_commit").await;
}

/// A message's headers as (name, text value).
type Headers = Vec<(String, Option<String>)>;

/// Every message of `topic` as (partition, headers, JSON value), read committed.
fn consume_placed(topic: &str, partitions: i32) -> Vec<(i32, Headers, serde_json::Value)> {
    use rdkafka::message::Headers;
    let mut out = Vec::new();
    read_all(topic, partitions, "read_committed", |m| {
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            h.value.map(|v| String::from_utf8_lossy(v).into_owned()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let value = m
            .payload()
            .and_then(|p| serde_json::from_slice(p).ok())
            .unwrap_or(serde_json::Value::Null);
        out.push((m.partition(), headers, value));
    });
    out
}

/// `[sink.kafka]`: each record picks its topic and partition from fields and carries
/// headers; a record naming a topic that does not exist, an internal topic, or a
/// partition its topic lacks becomes a dead letter (in the same transactions) instead
/// of failing every transaction it lands in; the rest arrive exactly where they asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_choose_topic_partition_and_headers_and_bad_choices_are_dead_letters() {
    let j = kafka_job("k2k_route", "500ms").await;
    let alt = unique("alt");
    create_topic(&alt, 3).await;
    let toml = std::fs::read_to_string(&j.config)
        .expect("config")
        .replace(
            "[[decode.fields]]\nname = \"body\"",
            "[[decode.fields]]\nname = \"dest\"\ntype = \"string\"\nrequired = false\n\n[[decode.fields]]\nname = \"part\"\ntype = \"int\"\nrequired = false\n\n[[decode.fields]]\nname = \"region\"\ntype = \"string\"\nrequired = false\n\n[[decode.fields]]\nname = \"body\"",
        )
        .replace(
            "[dead_letter]",
            "[sink.kafka]\ntopic_field = \"dest\"\npartition_field = \"part\"\nheaders = { region = \"region\", from_offset = \"kafka.offset\" }\n\n[sink.kafka.properties]\n\"compression.type\" = \"lz4\"\n\n[dead_letter]",
        );
    std::fs::write(&j.config, toml).expect("config");
    // Even ids ask for `alt` and a partition of it, odd ones the default topic and the
    // partitioner; every 50 ids three ask for what cannot be.
    let total = 600u64;
    let input: Vec<(String, Option<String>)> = (0..total)
        .map(|i| {
            let (dest, part) = match i % 50 {
                1 => ("\"no_such_topic_anywhere\"".to_string(), "null".to_string()),
                3 => ("\"__consumer_offsets\"".to_string(), "null".to_string()),
                5 => ("null".to_string(), "7".to_string()),
                _ if i % 2 == 0 => (format!("\"{alt}\""), ((i / 2) % 3).to_string()),
                _ => ("null".to_string(), "null".to_string()),
            };
            let region = if i % 4 == 0 { "\"eu\"" } else { "null" };
            let body = format!(r#"{{"id": {i}, "dest": {dest}, "part": {part}, "region": {region}, "body": "b{i}"}}"#);
            (i.to_string(), Some(body))
        })
        .collect();
    produce(&j.input, input);
    let bad = 3 * total / 50;
    let s = Sluice::start(&j.config, &j.log);
    let (dlq, out, alt2) = (j.dlq.clone(), j.output.clone(), alt.clone());
    let done = wait_until(Duration::from_secs(90), || {
        let (dlq, out, alt) = (dlq.clone(), out.clone(), alt2.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                consume_all(&dlq, 1, "read_committed").len() as u64 >= bad
                    && (committed_ids(&out, 2).len() + committed_ids(&alt, 3).len()) as u64 >= total - bad
            })
            .await
            .unwrap_or(false)
        }
    })
    .await;
    if !done {
        let (dlq, out, alt) = (j.dlq.clone(), j.output.clone(), alt.clone());
        let counts = tokio::task::spawn_blocking(move || {
            (
                consume_all(&dlq, 1, "read_committed").len(),
                committed_ids(&out, 2).len(),
                committed_ids(&alt, 3).len(),
            )
        })
        .await
        .expect("read");
        panic!("(dead, default, alt) = {counts:?}; {}", s.log_tail());
    }
    assert!(s.terminate().success());

    let (alt3, out2, dlq2) = (alt.clone(), j.output.clone(), j.dlq.clone());
    let (on_alt, on_default, dead) = tokio::task::spawn_blocking(move || {
        (
            consume_placed(&alt3, 3),
            consume_placed(&out2, 2),
            consume_all(&dlq2, 1, "read_committed"),
        )
    })
    .await
    .expect("read");
    let bad_ids: Vec<u64> = (0..total).filter(|i| [1, 3, 5].contains(&(i % 50))).collect();
    let mut dead_ids: Vec<u64> = dead
        .iter()
        .map(|d| {
            let payload: serde_json::Value =
                serde_json::from_str(d["payload"].as_str().expect("payload")).expect("payload json");
            payload["id"].as_u64().expect("id")
        })
        .collect();
    dead_ids.sort_unstable();
    assert_eq!(
        dead_ids, bad_ids,
        "exactly the impossible records are dead letters, once"
    );
    for d in &dead {
        let reason = d["reason"].as_str().unwrap_or_default();
        assert!(
            ["does not exist", "internal topic", "partition 7"]
                .iter()
                .any(|r| reason.contains(r)),
            "{reason}"
        );
    }
    let mut seen = Vec::new();
    for (partition, headers, v) in &on_alt {
        let id = v["id"].as_u64().expect("id");
        assert_eq!(id % 2, 0, "only even ids asked for {alt}");
        assert_eq!(i64::from(*partition), v["part"].as_i64().expect("part"), "id {id}");
        let region = headers.iter().find(|(k, _)| k == "region").map(|(_, v)| v.clone());
        let want = if id % 4 == 0 {
            Some(Some("eu".to_string()))
        } else {
            Some(None)
        };
        assert_eq!(region, want, "id {id}: a null field is a header without value");
        assert!(headers
            .iter()
            .any(|(k, v)| k == "from_offset" && v.as_deref().is_some_and(|o| o.parse::<i64>().is_ok())));
        seen.push(id);
    }
    for (_, _, v) in &on_default {
        let id = v["id"].as_u64().expect("id");
        assert_eq!(id % 2, 1, "id {id} went to the default topic");
        seen.push(id);
    }
    seen.sort_unstable();
    let mut want: Vec<u64> = (0..total).filter(|i| !bad_ids.contains(i)).collect();
    want.sort_unstable();
    assert_eq!(seen, want, "every other record once, where it asked to go");
}

/// The Kafka two-phase sink of a job split over three instances, single instances
/// SIGKILLed at random while input arrives: each commits through transactional ids and
/// a commit topic of its own (`<job>.<k>`), and the output holds every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_into_kafka_two_phase_killed_at_random_are_exactly_once() {
    let j = kafka_job("k2k_split", "500ms").await;
    let toml = std::fs::read_to_string(&j.config).expect("config");
    std::fs::write(&j.config, format!("{toml}\n[cluster]\ninstances = 3\n")).expect("config");
    const TOTAL: u64 = 30_000;
    let input = j.input.clone();
    let feeder = std::thread::spawn(move || {
        for part in 0..15 {
            produce(&input, (part * 2_000..(part + 1) * 2_000).map(record));
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let start = |k: u32| Sluice::start_args(&j.config, &j.log, &[], &["--instance", &k.to_string()]);
    let mut running: Vec<Option<Sluice>> = (0..3).map(|k| Some(start(k))).collect();
    let mut rng = rand::rng();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..3_500))).await;
        let k = rng.random_range(0..3usize);
        if let Some(p) = running[k].take() {
            p.kill9();
        }
        running[k] = Some(start(k as u32));
    }
    feeder.join().expect("feeder");
    let (out, n) = (j.output.clone(), TOTAL as usize);
    let done = wait_until(Duration::from_secs(120), || {
        let out = out.clone();
        async move {
            tokio::task::spawn_blocking(move || committed_ids(&out, 2).len() >= n)
                .await
                .unwrap_or(false)
        }
    })
    .await;
    for p in running.iter_mut().filter_map(Option::take) {
        assert!(p.terminate().success(), "{}", log_without(&j.log, "reading partition"));
    }
    assert!(
        done,
        "not every record arrived: {}",
        log_without(&j.log, "reading partition")
    );
    assert_each_once(&j, TOTAL as i64).await;
    // Each instance committed through a commit topic of its own.
    let job = j.job.clone();
    let topics: Vec<String> = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka())
            .create()
            .expect("consumer");
        let md = c.fetch_metadata(None, Duration::from_secs(10)).expect("metadata");
        md.topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|t| t.starts_with(&format!("sluice.{job}.")))
            .collect()
    })
    .await
    .expect("metadata");
    for k in 0..3 {
        let own = format!("sluice.{}.{k}.commits", j.job);
        assert!(topics.contains(&own), "no {own} among {topics:?}");
    }
}
