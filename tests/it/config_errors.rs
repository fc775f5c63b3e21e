//! Every kind of configuration mistake stops `sluice` before it starts, with a non-zero
//! exit and a message that names the key (and the file).

use std::process::Command;

use crate::common::*;

fn base() -> String {
    job_toml(
        "cfg",
        "t",
        "s",
        "idempotent",
        std::path::Path::new("/tmp/sluice-cfg-test"),
    )
}

/// Run `sluice check` on `toml` (with `env`), return (exit ok, stdout, stderr).
fn run_check(toml: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), toml);
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .expect("run sluice check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `sluice check`, return (exit ok, stderr).
fn check(toml: &str, env: &[(&str, &str)]) -> (bool, String) {
    let (ok, _, stderr) = run_check(toml, env);
    (ok, stderr)
}

fn rejected(toml: &str, env: &[(&str, &str)], key: &str) {
    let (ok, stderr) = check(toml, env);
    assert!(!ok, "accepted a config that should fail on {key}");
    assert!(stderr.contains(key), "message does not name `{key}`: {stderr}");
    assert!(stderr.contains("job.toml"), "message does not name the file: {stderr}");
}

#[test]
fn the_base_config_is_valid() {
    let (ok, stderr) = check(&base(), &[]);
    assert!(ok, "{stderr}");
}

/// Lists from the environment as the README documents them: comma-separated.
#[test]
fn lists_come_from_the_environment_comma_separated() {
    let (ok, stderr) = check(&base(), &[("SLUICE__SOURCE__TOPICS", "a, b")]);
    assert!(ok, "{stderr}");
    rejected(&base(), &[("SLUICE__SOURCE__TOPICS", "a,a")], "source.topics");
}

#[test]
fn unknown_keys_are_named() {
    rejected(
        &base().replace("parallelism = 2\npartition", "paralelism = 2\npartition"),
        &[],
        "source.paralelism",
    );
    rejected(&format!("{}\n[sinc]\nkind = 1\n", base()), &[], "sinc");
}

#[test]
fn wrong_types_are_named() {
    rejected(
        &base().replace("batch_size = 2000", "batch_size = \"lots\""),
        &[],
        "batch_size",
    );
    rejected(
        &base().replace("interval = \"500ms\"", "interval = \"soon\""),
        &[],
        "interval",
    );
}

#[test]
fn impossible_values_are_named() {
    rejected(
        &base().replace("parallelism = 2\npartition", "parallelism = 0\npartition"),
        &[],
        "source.parallelism",
    );
    rejected(
        &base().replace("interval = \"500ms\"", "interval = \"0s\""),
        &[],
        "checkpoint.interval",
    );
    let sqlite = base()
        .replace("kind = \"postgres\"", "kind = \"sqlite\"")
        .replace(&pg_url(), "sqlite://x.db")
        .replace("strategy = \"idempotent\"", "strategy = \"two_phase\"")
        .replace("parallelism = 2\nbatch_size", "parallelism = 1\nbatch_size");
    rejected(&sqlite, &[], "sink.strategy");
    rejected(
        &base().replace("[sink]", "[sink]\npartitioner = \"broadcast\""),
        &[],
        "sink.partitioner",
    );
    rejected(
        &base().replace("type = \"int\"", "type = \"integer\""),
        &[],
        "int, float, string, bool, json",
    );
    rejected(
        &base().replace("strategy = \"idempotent\"", "strategy = \"exactly\""),
        &[],
        "idempotent, two_phase",
    );
    let props = "[source.properties]\n\"fetch.max.bytez\" = 1024\n\n[[decode.fields]]";
    rejected(
        &base().replacen("[[decode.fields]]", props, 1),
        &[],
        "source.properties.fetch.max.bytez",
    );
    let props = "[source.properties]\n\"fetch.max.bytes\" = \"lots\"\n\n[[decode.fields]]";
    rejected(
        &base().replacen("[[decode.fields]]", props, 1),
        &[],
        "source.properties.fetch.max.bytes",
    );
}

/// A key only another kind of sink has is refused, named, rather than ignored.
#[test]
fn keys_of_another_sink_kind_are_refused() {
    rejected(
        &base().replace("[sink]", "[sink]\nredis_command = \"hset\""),
        &[],
        "sink.redis_command",
    );
    rejected(
        &base().replace("[sink]", "[sink.kafka]\nvalue = \"payload\"\n\n[sink]"),
        &[],
        "sink.kafka",
    );
    rejected(
        &base(),
        &[("SLUICE__SINK__REDIS_COMMAND", "xadd")],
        "sink.redis_command",
    );
}

#[test]
fn environment_overrides_are_checked_too() {
    rejected(&base(), &[("SLUICE__SINK__PARALLELISM", "0")], "sink.parallelism");
    let (ok, stderr) = check(&base(), &[("SLUICE__SINK__BATCH_SIZE", "77")]);
    assert!(ok, "{stderr}");
}

#[test]
fn secrets_are_refused_in_the_file() {
    rejected(
        &base().replace("[sink]", "[sink]\npassword = \"hunter2\""),
        &[],
        "sink.password",
    );
    rejected(
        &base().replace("postgres://postgres@", "postgres://postgres:hunter2@"),
        &[],
        "sink.url",
    );
    let url = pg_url();
    rejected(
        &base().replace(&url, &format!("{url}?sslmode=prefer&password=hunter2")),
        &[],
        "sink.url",
    );
    // The same password from the environment is fine.
    let (ok, stderr) = check(&base(), &[("SLUICE__SINK__PASSWORD", "hunter2")]);
    assert!(ok, "{stderr}");
}

/// What `sluice check` prints (both streams), and whether it succeeded.
fn check_output(toml: &str, env: &[(&str, &str)]) -> (bool, String) {
    let (ok, stdout, stderr) = run_check(toml, env);
    (ok, stdout + &stderr)
}

#[test]
fn secrets_are_never_printed_and_env_values_are_not_re_read_as_numbers() {
    let env = [
        ("SLUICE__SINK__PASSWORD", "0012345"),
        ("SLUICE__JOB__NAME", "007"),
        ("SLUICE__SOURCE__PROPERTIES__SASL__PASSWORD", "hunter2"),
    ];
    let (ok, out) = check_output(&base(), &env);
    assert!(ok, "{out}");
    assert!(out.contains("job `007`"), "the job name lost its zeros: {out}");
    assert!(!out.contains("0012345") && !out.contains("12345"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    // A misspelt secret property is refused without echoing its value.
    let (ok, out) = check_output(&base(), &[("SLUICE__SOURCE__PROPERTIES__SASL__PASWORD", "hunter2")]);
    assert!(!ok);
    assert!(out.contains("sasl.pasword"), "{out}");
    assert!(!out.contains("hunter2"), "the secret was echoed: {out}");
}

#[test]
fn a_missing_file_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config", "/nonexistent/sluice.toml"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sluice.toml"));
}

/// A windowed job over the base config's fields (`id` int, `body` string).
fn windowed() -> String {
    base().replace("[checkpoint]", WINDOW_OPS).replace(
        "[sink]",
        "[sink]\ncolumns = [ { name = \"body\", value = \"body\" }, { name = \"n\", value = \"n\" } ]\nkey = [\"body\"]",
    )
}

const WINDOW_OPS: &str = r#"[time]
field = "id"

[[operators]]
kind = "key_by"
fields = ["body"]

[[operators]]
kind = "window"
id = "counts"
parallelism = 2
assigner = "tumbling"
size = "10s"
aggregates = [ { fn = "count", as = "n" }, { fn = "sum", field = "id", as = "total" } ]

[checkpoint]"#;

#[test]
fn the_windowed_config_is_valid() {
    let (ok, stderr) = check(&windowed(), &[]);
    assert!(ok, "{stderr}");
}

#[test]
fn graph_and_schema_mistakes_are_named() {
    let w = windowed();
    rejected(
        &w.replace(
            "kind = \"key_by\"\nfields = [\"body\"]",
            "kind = \"key_by\"\nfields = [\"bodie\"]",
        ),
        &[],
        "operators[0].fields",
    );
    rejected(
        &w.replace("[[operators]]\nkind = \"key_by\"\nfields = [\"body\"]\n", ""),
        &[],
        "operators[0].kind",
    );
    rejected(
        &w.replace(
            "parallelism = 2\nassigner",
            "parallelism = 3\npartitioner = \"forward\"\nassigner",
        ),
        &[],
        "operators[1].partitioner",
    );
    rejected(
        &w.replace("field = \"id\", as = \"total\"", "field = \"idd\", as = \"total\""),
        &[],
        "operators[1].aggregates[1].field",
    );
    rejected(
        &w.replace("field = \"id\", as = \"total\"", "field = \"body\", as = \"total\""),
        &[],
        "operators[1].aggregates[1].field",
    );
    rejected(
        &w.replace("assigner = \"tumbling\"\nsize = \"10s\"", "assigner = \"global\""),
        &[],
        "operators[1].trigger",
    );
    rejected(
        &w.replace(
            "assigner = \"tumbling\"\nsize = \"10s\"",
            "assigner = \"sliding\"\nsize = \"10s\"",
        ),
        &[],
        "operators[1].slide",
    );
    rejected(
        &w.replace("value = \"n\" }", "value = \"kafka.offset\" }"),
        &[],
        "sink.columns.value",
    );
    rejected(
        &w.replace("value = \"n\" }", "value = \"m\" }"),
        &[],
        "sink.columns.value",
    );
    rejected(&w.replace("key = [\"body\"]", "key = [\"nope\"]"), &[], "sink.key");
    rejected(&w.replace("field = \"id\"\n", "field = \"when\"\n"), &[], "time.field");
    rejected(
        &w.replace("id = \"counts\"", "id = \"key_by_0\""),
        &[],
        "operators[1].id",
    );
    rejected(&w.replace("id = \"counts\"", "id = \"sink\""), &[], "operators[1].id");
    rejected(
        &w.replace("[sink]", "[sink]\npartitioner = \"forward\"")
            .replace("parallelism = 2\nassigner", "parallelism = 3\nassigner"),
        &[],
        "sink.partitioner",
    );
    // Forward with equal parallelism is fine: the sink runs chained to the window.
    let (ok, stderr) = check(&w.replace("[sink]", "[sink]\npartitioner = \"forward\""), &[]);
    assert!(ok, "{stderr}");
}

/// Values a careless operator writes: each named, none accepted.
#[test]
fn footguns_are_refused() {
    let b = base();
    rejected(
        &b.replace("status_interval = \"0s\"", "status_interval = \"1ns\""),
        &[],
        "job.status_interval",
    );
    rejected(
        &b.replace("timeout = \"20s\"", "timeout = \"1ns\""),
        &[],
        "checkpoint.timeout",
    );
    rejected(
        &b.replace("parallelism = 2\npartition", "parallelism = 2.5\npartition"),
        &[],
        "source.parallelism",
    );
    rejected(
        &b.replace("topics = [\"t\"]", "topics = [\"t\", \"t\"]"),
        &[],
        "source.topics",
    );
    let servers = format!("bootstrap_servers = \"{}\"", kafka());
    rejected(
        &b.replace(&servers, "bootstrap_servers = \" , \""),
        &[],
        "source.bootstrap_servers",
    );
    rejected(
        &b.replace("dir = \"/tmp/sluice-cfg-test\"", "dir = \"/\""),
        &[],
        "checkpoint.dir",
    );
    rejected(
        &b.replace("dir = \"/tmp/sluice-cfg-test\"", "dir = \"\""),
        &[],
        "checkpoint.dir",
    );
    rejected(
        &b.replace("dir = \"/tmp/sluice-cfg-test\"", "dir = \"/tmp/..\""),
        &[],
        "checkpoint.dir",
    );
    rejected(
        &b.replace("table = \"s.dead\"", &format!("table = \"s.{}\"", "d".repeat(84))),
        &[],
        "dead_letter.table",
    );
    rejected(
        &b.replace(
            "[dead_letter]",
            &format!(
                "columns = [ {{ name = \"{}\", value = \"id\" }} ]\n\n[dead_letter]",
                "c".repeat(70)
            ),
        ),
        &[],
        "sink.columns.name",
    );
    rejected(
        &b.replace("table = \"s.events\"", &format!("table = \"s.{}\"", "e".repeat(64))),
        &[],
        "sink.table",
    );
    // Records may not write where sluice keeps its own Redis keys (markers, dead letters).
    for table in ["sluice", "sluice:x"] {
        rejected(
            &redis_job_toml("cfg", "t", std::path::Path::new("/tmp/sluice-cfg-test"), table, ""),
            &[],
            "sink.table",
        );
    }
    let deep = format!("SLUICE{}", "__X".repeat(2_000));
    rejected(&b, &[(deep.as_str(), "1")], "nested deeper than any config key");
    // The loader matches the prefix without regard to case: so does the guard.
    let deep = format!("sluice{}", "__x".repeat(30_000));
    rejected(&b, &[(deep.as_str(), "1")], "nested deeper than any config key");
}

/// The base job with an `enrich` operator over `store` (fields `id` int, `body` string).
fn enriched(extra: &str, store: &str) -> String {
    base().replace(
        "[checkpoint]",
        &format!(
            "[[operators]]\nkind = \"enrich\"\nid = \"dim\"\nkey = \"body\"\n\
             columns = [ {{ name = \"country\", type = \"string\" }} ]\n{extra}\n\n[operators.store]\n{store}\n\n[checkpoint]"
        ),
    )
}

#[test]
fn enrichment_mistakes_are_named() {
    let pg = "kind = \"postgres\"\ntable = \"dims.users\"";
    let (ok, stderr) = check(&enriched("", pg), &[]);
    assert!(ok, "the sink's database is the default store: {stderr}");
    rejected(
        &enriched("", pg).replace("key = \"body\"", "key = \"bodie\""),
        &[],
        "operators[0].key",
    );
    rejected(
        &enriched("", pg).replace("name = \"country\"", "name = \"id\""),
        &[],
        "operators[0].columns[0].name",
    );
    rejected(
        &enriched("", "kind = \"hbase\"\ntable = \"users\""),
        &[],
        "operators[0].store.url",
    );
    rejected(
        &enriched("", "kind = \"hbase\"\nurl = \"http://h:8080\"\ntable = \"users\"")
            .replace("type = \"string\" }", "type = \"string\", from = \"country\" }"),
        &[],
        "operators[0].columns[0].from",
    );
    // A key only another kind of store has is refused, named, rather than ignored.
    rejected(
        &enriched(
            "",
            "kind = \"hbase\"\nurl = \"http://h:8080\"\ntable = \"users\"\nkey_column = \"id\"",
        ),
        &[],
        "operators[0].store.key_column",
    );
    rejected(
        &enriched(
            "",
            "kind = \"sqlite\"\nurl = \"sqlite://x.db\"\ntable = \"users\"\nconnections = 8",
        ),
        &[],
        "operators[0].store.connections",
    );
    rejected(
        &enriched("[operators.redis]\nurl = \"redis://:hunter2@h:6379\"", pg),
        &[],
        "operators[0].redis.url",
    );
    rejected(&enriched("capacity = 0", pg), &[], "operators[0].capacity");
    rejected(&enriched("partitioner = \"hash\"", pg), &[], "operators[0].parallelism");
    // Inside an operator, serde names the operator and the allowed values, not the key.
    let (ok, stderr) = check(&enriched("on_missing = \"drop\"", pg), &[]);
    assert!(
        !ok && stderr.contains("operators[0]") && stderr.contains("`dead_letter`"),
        "{stderr}"
    );
    let (_, stderr) = check(
        &enriched("[operators.redis]\nurl = \"redis://:hunter2@h:6379\"", pg),
        &[],
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// What a Kafka sink's exactly once depends on cannot be overridden by its properties,
/// and `[sink.kafka]` is refused on other sinks.
#[test]
fn kafka_sink_options_are_checked() {
    rejected(
        &format!("{}\n[sink.kafka]\ntopic_field = \"x\"\n", base()),
        &[],
        "sink.kafka",
    );
    let start = base().find("[sink]").expect("sink section");
    let end = base().find("[metrics]").expect("metrics section");
    let kafka = format!(
        "{}[sink]\nkind = \"kafka\"\nurl = \"127.0.0.1:1\"\ntopic = \"o\"\nstrategy = \"two_phase\"\n\n\
         [sink.kafka.properties]\n\"compression.type\" = \"lz4\"\n{{}}\n\n[dead_letter]\nkind = \"kafka\"\ntopic = \"d\"\n\n{}",
        &base()[..start],
        &base()[end..]
    );
    let (ok, stderr) = check(&kafka.replace("{}", ""), &[]);
    assert!(ok, "{stderr}");
    // A misspelt property, and a codec this build of librdkafka lacks.
    for wrong in ["\"compresion.type\" = \"lz4\"", "\"compression.codec\" = \"zstd\""] {
        rejected(&kafka.replace("{}", wrong), &[], "sink.kafka.properties");
    }
    for owned in ["transactional.id", "enable.idempotence", "acks", "bootstrap.servers"] {
        rejected(
            &kafka.replace("{}", &format!("\"{owned}\" = \"x\"")),
            &[],
            &format!("sink.kafka.properties.{owned}"),
        );
    }
}

#[test]
fn a_split_job_is_checked() {
    let split = |lines: &str| format!("{}\n[cluster]\n{lines}\n", base());
    let (ok, stderr) = check(&split("instances = 3\ninstance = 2"), &[]);
    assert!(ok, "{stderr}");
    // The slot may come from the environment (a StatefulSet pod's ordinal).
    let (ok, stderr) = check(&split("instances = 3"), &[("SLUICE__CLUSTER__INSTANCE", "1")]);
    assert!(ok, "{stderr}");
    // No slot: the process claims one by a lease beside the checkpoints.
    let (ok, stderr) = check(&split("instances = 3"), &[]);
    assert!(ok, "{stderr}");
    rejected(&split("instances = 3\nlease_ttl = \"100ms\""), &[], "cluster.lease_ttl");
    // Commands about one instance's transactions or checkpoints must be told which.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), &split("instances = 3"));
    for args in [["txn", "list"], ["checkpoints", "list"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run sluice");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && said.contains("SLUICE__CLUSTER__INSTANCE"),
            "{args:?}: {said}"
        );
    }
    rejected(&split("instances = 3\ninstance = 3"), &[], "cluster.instance");
    rejected(&split("instances = 0"), &[], "cluster.instances");
    rejected(
        &split("instances = 3\ninstance = 0").replace("storage = \"filesystem\"", "storage = \"memory\""),
        &[],
        "checkpoint.storage",
    );
    // A window keeps keyed state: its keys cross instances through a hop, written by
    // the stage before it and read by the window's.
    let w = format!("{}\n[cluster]\ninstances = 2\ninstance = 0\n", windowed());
    let (ok, stdout, stderr) = run_check(&w, &[]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("forward → counts.out") && stdout.contains("counts.in → counts"),
        "{stdout}"
    );
}

#[test]
fn the_shipped_configs_are_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    for file in [
        "deploy/kubernetes/job.toml",
        "config/docker.toml",
        "config/docker-two-phase.toml",
        "config/docker-cluster.toml",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["check", "--config"])
            .arg(format!("{root}/{file}"))
            .env("SLUICE__CLUSTER__INSTANCE", "0")
            .output()
            .expect("run sluice check");
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The new targets' own mistakes: a files sink's url, strategy, table, sizes and
/// partition levels; a MySQL sink's url and a password in it.
#[test]
fn mysql_and_files_sink_mistakes_name_the_key() {
    let files = base()
        .replace(&format!("url = \"{}\"", pg_url()), "url = \"/tmp/lake\"")
        .replace("kind = \"postgres\"", "kind = \"files\"")
        .replace("table = \"s.events\"", "table = \"events\"")
        .replace("strategy = \"idempotent\"", "strategy = \"two_phase\"");
    let (ok, stderr) = check(&files, &[]);
    assert!(ok, "{stderr}");
    rejected(&files.replace("two_phase", "wal"), &[], "sink.strategy");
    rejected(&files.replace("/tmp/lake", "ftp://lake"), &[], "sink.url");
    rejected(
        &files.replace("table = \"events\"", "table = \"_hidden\""),
        &[],
        "sink.table",
    );
    let with = |lines: &str| files.replace("[dead_letter]", &format!("[sink.files]\n{lines}\n[dead_letter]"));
    assert!(check(&with("partition_by = [\"dt=%Y-%m-%d\", \"id\"]"), &[]).0);
    rejected(&with("partition_by = [\"dt=%Q\"]"), &[], "sink.files.partition_by");
    rejected(&with("partition_by = [\"a/b\"]"), &[], "sink.files.partition_by");
    rejected(&with("max_file_bytes = 10"), &[], "sink.files.max_file_bytes");
    rejected(&with("min_file_bytes = 999999999999"), &[], "sink.files.min_file_bytes");
    rejected(&with("format = \"csv\""), &[], "format");
    rejected(
        &base().replace("[dead_letter]", "[sink.files]\nformat = \"jsonl\"\n[dead_letter]"),
        &[],
        "sink.files",
    );
    let mysql = base()
        .replace(&format!("url = \"{}\"", pg_url()), "url = \"mysql://app@db:3306/shop\"")
        .replace("kind = \"postgres\"", "kind = \"mysql\"");
    let (ok, stderr) = check(&mysql, &[]);
    assert!(ok, "{stderr}");
    rejected(&mysql.replace("mysql://app@db", "postgres://app@db"), &[], "sink.url");
    rejected(
        &mysql.replace("mysql://app@db", "mysql://app:secret@db"),
        &[],
        "sink.url",
    );
}
