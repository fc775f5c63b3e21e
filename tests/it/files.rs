//! Files as a target: Parquet and JSON-lines part files in a local directory and in the
//! S3-compatible test server, read back by an independent reader (pyarrow,
//! `tests/read_files.py`) as a reader of the dataset lists them. Through SIGKILLs and
//! crashes at each narrow window, every record is in exactly one published file, and no
//! staged file is left once the job has recovered and stopped.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use rand::Rng;

use crate::common::*;

/// What the reader found: rows (with `dir.<name>` for their partition directories),
/// published files, staged files left.
struct Read {
    rows: Vec<serde_json::Value>,
    files: Vec<String>,
    staged: Vec<String>,
    /// Each file's size.
    sizes: serde_json::Map<String, serde_json::Value>,
}

/// Read the dataset at `url` with pyarrow (`scripts/ensure-readers`).
fn read(url: &str) -> Read {
    let python = readers_python();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/read_files.py");
    let out = std::process::Command::new(&python)
        .args([script, url, &s3_endpoint()])
        .output()
        .unwrap_or_else(|e| panic!("{python} (scripts/ensure-readers): {e}"));
    assert!(
        out.status.success(),
        "read_files.py {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reader's JSON");
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    Read {
        rows: v["rows"].as_array().cloned().unwrap_or_default(),
        files: strings("files"),
        staged: strings("staged"),
        sizes: v["sizes"].as_object().cloned().unwrap_or_default(),
    }
}

/// A pass-through job into files.
struct FilesJob {
    /// The sink's url (a directory or `s3://…`); the dataset is `<url>/events`.
    url: String,
    topic: String,
    config: PathBuf,
    log: PathBuf,
    env: Vec<(&'static str, &'static str)>,
    produced: u64,
    _dir: tempfile::TempDir,
}

impl FilesJob {
    /// `format`: parquet or jsonl; `s3`: in a bucket of the test server, else a directory.
    async fn new(format: &str, s3: bool) -> FilesJob {
        Self::with(format, s3, "").await
    }

    /// [`FilesJob::new`] with more `[sink.files]` lines.
    async fn with(format: &str, s3: bool, more: &str) -> FilesJob {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, files_lines, env) = if s3 {
            let bucket = unique("lake").replace('_', "-");
            create_bucket(&bucket);
            (
                format!("s3://{bucket}/lake"),
                format!("endpoint = \"{}\"\n", s3_endpoint()),
                vec![("AWS_ACCESS_KEY_ID", S3_KEY.0), ("AWS_SECRET_ACCESS_KEY", S3_KEY.1)],
            )
        } else {
            (dir.path().join("lake").display().to_string(), String::new(), Vec::new())
        };
        let (topic, job) = (unique("files"), unique("files"));
        create_topic(&topic, 3).await;
        let toml = job_toml(&job, &topic, "x", "two_phase", &dir.path().join("cp"))
            .replace(&format!("url = \"{}\"", pg_url()), &format!("url = \"{url}\""))
            .replace("kind = \"postgres\"", "kind = \"files\"")
            .replace("table = \"x.events\"", "table = \"events\"")
            .replace("table = \"x.dead\"", "table = \"dead\"")
            .replace(
                "[dead_letter]",
                &format!(
                    "[sink.files]\nformat = \"{format}\"\npartition_by = [\"dt=%Y-%m-%d\", \"hour=%H\"]\n\
                     max_file_bytes = 2000000\n{files_lines}{more}\n[dead_letter]"
                ),
            );
        FilesJob {
            url,
            topic,
            config: write_config(dir.path(), &toml),
            log: dir.path().join("sluice.log"),
            env,
            produced: 0,
            _dir: dir,
        }
    }

    fn dataset(&self) -> String {
        format!("{}/events", self.url)
    }

    fn start_with(&self, more: &[(&str, &str)]) -> Sluice {
        let mut env = self.env.clone();
        env.extend(more.iter().copied());
        Sluice::start_with(&self.config, &self.log, &env)
    }

    /// Produce the next `n` ids in the background, in ten slices 300 ms apart.
    fn feed(&mut self, n: u64) -> JoinHandle<()> {
        self.produced += n;
        feed_slices(&self.topic, self.produced - n, n)
    }

    fn ids(&self) -> (Vec<i64>, Read) {
        let read = read(&self.dataset());
        let ids = read.rows.iter().filter_map(|r| r["id"].as_i64()).collect();
        (ids, read)
    }

    /// Run once more until every produced id is in a published file, stop, and check:
    /// each id once, in files under their partition directories, no staged file left.
    async fn finish(&self) {
        let s = self.start_with(&[]);
        let total = self.produced as usize;
        let done = wait_until(Duration::from_secs(120), || async {
            let this = &self;
            tokio::task::block_in_place(|| this.ids().0.len() >= total)
        })
        .await;
        let warnings = || log_without(&self.log, " INFO ");
        assert!(
            done,
            "{} of {total}: {}\n{}",
            self.ids().0.len(),
            s.log_tail(),
            warnings()
        );
        let status = s.terminate();
        assert!(status.success(), "{status}: {}", warnings());
        let (mut ids, read) = self.ids();
        assert_eq!(ids.len(), total, "records lost or doubled");
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids, (0..total as i64).collect::<Vec<_>>(), "a record in two files");
        assert!(read.staged.is_empty(), "staged files left: {:?}", read.staged);
        assert!(
            read.files.iter().all(|f| f.starts_with("dt=") && f.contains("/hour=")),
            "{:?}",
            read.files
        );
        let today = time::OffsetDateTime::now_utc().date().to_string();
        assert!(
            read.rows
                .iter()
                .all(|r| r["dir.dt"].as_str().is_some_and(|d| d.len() == 10)),
            "partition directories: {:?}",
            read.rows.first()
        );
        assert!(read.rows.iter().any(|r| r["dir.dt"] == today.as_str()));
    }

    /// SIGKILLed `kills` times at random moments while input arrives, then finished.
    async fn killed(mut self, kills: usize) {
        let feeder = self.feed(20_000);
        kill_at_random(&self.config, &self.log, &self.env, kills).await;
        feeder.join().expect("feeder");
        self.finish().await;
    }

    /// Crashed at each narrow window in turn, each run fed records of its own, then
    /// finished.
    #[cfg(feature = "failpoints")]
    async fn crashed_at_every_window(mut self) {
        let (config, log, env) = (self.config.clone(), self.log.clone(), self.env.clone());
        crash_at_every_window(&config, &log, &env, || self.feed(3_000));
        self.finish().await;
    }
}

/// Files smaller than `min_file_bytes` at a checkpoint are held (staged, listed in the
/// checkpoint) and merged with later epochs' rows, through SIGKILLs: every record once,
/// and only files that `max_file_age` or a restart let out early are smaller than the
/// minimum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_are_held_and_merged_through_kills() {
    let min = 300_000u64;
    let mut j = FilesJob::with(
        "jsonl",
        false,
        &format!("min_file_bytes = {min}\nmax_file_age = \"4s\"\n"),
    )
    .await;
    let feeder = j.feed(30_000);
    for _ in 0..3 {
        let s = j.start_with(&[]);
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1_500..3_000))).await;
        s.kill9();
    }
    feeder.join().expect("feeder");
    j.finish().await;
    let read = read(&j.dataset());
    let small: Vec<(&String, u64)> = read
        .sizes
        .iter()
        .filter_map(|(f, s)| Some((f, s.as_u64()?)))
        .filter(|(_, s)| *s < min)
        .collect();
    let total: u64 = read.sizes.values().filter_map(|s| s.as_u64()).sum();
    println!(
        "{} files, {} smaller than {min}, {total} bytes",
        read.files.len(),
        small.len()
    );
    // At most one early file per subtask and partition directory at each restore (it
    // publishes what was held, merged) and each time the input paused for max_file_age
    // (at the end of the input and of the last run).
    let restores = std::fs::read_to_string(&j.log)
        .unwrap_or_default()
        .matches("restoring from checkpoint")
        .count();
    let early = 2 * (restores + 2);
    assert!(small.len() <= early, "{restores} restores: {small:?}");
    assert!(
        read.files.len() as u64 <= total / min + early as u64,
        "{:?}",
        read.sizes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_files_killed_exactly_once() {
    FilesJob::new("parquet", false).await.killed(4).await;
}

#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_files_in_s3_killed_exactly_once() {
    FilesJob::new("parquet", true).await.killed(4).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_files_crashed_at_every_narrow_window() {
    FilesJob::new("jsonl", false).await.crashed_at_every_window().await;
}

#[cfg(all(feature = "failpoints", feature = "s3"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_files_in_s3_crashed_at_every_narrow_window() {
    FilesJob::new("parquet", true).await.crashed_at_every_window().await;
}

/// A second process of a running job, with a checkpoint directory of its own, is
/// refused by the dataset's lock before it could delete the first one's staged files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_writing_the_same_files_is_refused() {
    let mut j = FilesJob::new("parquet", false).await;
    let feeder = j.feed(2_000);
    let first = j.start_with(&[]);
    let owns = wait_until(Duration::from_secs(30), || async {
        std::fs::read_to_string(&j.log)
            .unwrap_or_default()
            .contains("this process owns the job")
    })
    .await;
    assert!(owns, "{}", first.log_tail());
    let other = tempfile::tempdir().expect("tempdir");
    let toml = std::fs::read_to_string(&j.config).expect("config");
    let cp = j._dir.path().join("cp").display().to_string();
    let config = write_config(
        other.path(),
        &toml.replace(&cp, &other.path().join("cp").display().to_string()),
    );
    let log = other.path().join("sluice.log");
    let mut second = Sluice::start(&config, &log);
    let status = second.wait_exit(Duration::from_secs(30));
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.is_some_and(|s| !s.success()), "the second process ran: {said}");
    assert!(
        said.contains("is already running") && said.contains("_sluice_owner"),
        "{said}"
    );
    feeder.join().expect("feeder");
    assert!(first.terminate().success());
    j.finish().await;
}

/// Partition directories from a column (its value escaped, null as Hive's default), the
/// column not repeated in the files, Parquet types from the stream's schema, and
/// records that do not decode as JSON-lines dead letters published with their epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_partitioned_by_a_column_and_dead_letters_are_files_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lake = dir.path().join("lake");
    let (topic, job) = (unique("fcol"), unique("fcol"));
    create_topic(&topic, 2).await;
    let toml = job_toml(&job, &topic, "x", "two_phase", &dir.path().join("cp"))
        .replace(
            &format!("url = \"{}\"", pg_url()),
            &format!("url = \"{}\"", lake.display()),
        )
        .replace("kind = \"postgres\"", "kind = \"files\"")
        .replace("table = \"x.events\"", "table = \"events\"")
        .replace("table = \"x.dead\"", "table = \"dead\"")
        .replace(
            "[[decode.fields]]\nname = \"body\"\ntype = \"string\"",
            "[[decode.fields]]\nname = \"body\"\ntype = \"string\"\n\n[[decode.fields]]\nname = \"country\"\n\
             type = \"string\"\nrequired = false\n\n[[decode.fields]]\nname = \"score\"\ntype = \"float\"",
        )
        .replace(
            "[dead_letter]",
            "[sink.files]\npartition_by = [\"country\"]\n\n[dead_letter]",
        );
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let countries = ["DE", "FR", "a/b", ""];
    produce(
        &topic,
        (0..1_000u64).map(|id| {
            let payload = match id % 100 {
                13 => "not json".to_string(),
                _ => {
                    let c = countries[id as usize % 4];
                    let country = if c.is_empty() {
                        "null".into()
                    } else {
                        format!("\"{c}\"")
                    };
                    format!(r#"{{"id": {id}, "body": "b{id}", "country": {country}, "score": {id}.5}}"#)
                }
            };
            (id.to_string(), Some(payload))
        }),
    );
    let s = Sluice::start(&config, &log);
    let dataset = format!("{}/events", lake.display());
    let done = wait_until(Duration::from_secs(60), || async {
        tokio::task::block_in_place(|| read(&dataset).rows.len() >= 990)
    })
    .await;
    assert!(done, "{}", s.log_tail());
    assert!(s.terminate().success());
    let data = read(&dataset);
    assert_eq!(data.rows.len(), 990);
    let dirs: std::collections::BTreeSet<&str> = data.rows.iter().filter_map(|r| r["dir.country"].as_str()).collect();
    assert_eq!(
        dirs.into_iter().collect::<Vec<_>>(),
        vec!["DE", "FR", "__HIVE_DEFAULT_PARTITION__", "a%2Fb"],
        "{:?}",
        data.files
    );
    let row = data.rows.iter().find(|r| r["id"] == 1).expect("row 1");
    assert!(
        row.get("country").is_none(),
        "the partition column is in the directory, not the file: {row}"
    );
    assert_eq!(row["score"], 1.5);
    assert_eq!(row["body"], "b1");
    let dead = read(&format!("{}/dead", lake.display()));
    assert_eq!(dead.rows.len(), 10, "{:?}", dead.files);
    assert!(dead
        .rows
        .iter()
        .all(|r| r["payload"] == "not json" && r["reason"].as_str().is_some()));
}
