//! The configuration reference, `docs/configuration-reference.md`, is generated from the
//! config types themselves: their fields, serde attributes and doc comments, read from
//! `src/config/*.rs` by `syn`, starting at `JobConfig`. This test fails when the file is
//! stale (a key added, renamed or documented anew without regenerating it) and when a
//! key has no doc comment. `scripts/config-reference` writes it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use quote::ToTokens;
use syn::{Attribute, Expr, Fields, GenericArgument, Item, Lit, PathArguments, Type};

/// A config type as parsed.
enum Def {
    Struct {
        doc: String,
        fields: Vec<FieldDef>,
        /// `#[serde(from = "Raw")]`: the keys are Raw's.
        from: Option<String>,
    },
    Enum {
        doc: String,
        /// `#[serde(tag = "...")]`.
        tag: Option<String>,
        untagged: bool,
        rename_all: Option<String>,
        /// (name as written in Rust, or `=renamed`; doc; what it holds).
        variants: Vec<(String, String, Payload)>,
        /// The `#[default]` variant, if one.
        default: Option<String>,
    },
}

/// What an enum's variant holds.
enum Payload {
    Unit,
    Type(Type),
    Fields(Vec<FieldDef>),
}

struct FieldDef {
    key: String,
    ty: Type,
    doc: String,
    /// `None`: required; `Some("")`: the type's default; else the default's value.
    default: Option<String>,
}

/// Every config type by name, and each file's `defaults::` functions by file.
struct Source {
    defs: BTreeMap<String, Def>,
    defaults: BTreeMap<String, String>,
}

fn doc_of(attrs: &[Attribute]) -> String {
    let mut lines = Vec::new();
    for a in attrs.iter().filter(|a| a.path().is_ident("doc")) {
        if let syn::Meta::NameValue(nv) = &a.meta {
            if let Expr::Lit(l) = &nv.value {
                if let Lit::Str(s) = &l.lit {
                    lines.push(s.value().trim().to_string());
                }
            }
        }
    }
    // The first paragraph: what the reference's one line needs.
    let text = lines.join("\n");
    let first = text.split("\n\n").next().unwrap_or_default();
    first
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// `serde(...)` items of `attrs` as (name, value) pairs (`default` alone: value "").
fn serde_of(attrs: &[Attribute]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for a in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        let _ = a.parse_nested_meta(|m| {
            let name = m.path.to_token_stream().to_string();
            let value = match m.value() {
                Ok(v) => v.parse::<Lit>().ok().and_then(|l| match l {
                    Lit::Str(s) => Some(s.value()),
                    _ => None,
                }),
                Err(_) => None,
            };
            out.push((name, value.unwrap_or_default()));
            Ok(())
        });
    }
    out
}

/// An enum variant as written in TOML.
fn variant_name(name: &str, rename_all: Option<&str>) -> String {
    match (name.strip_prefix('='), rename_all) {
        (Some(r), _) => r.to_string(),
        (None, Some("snake_case")) => snake(name),
        (None, Some("lowercase")) => name.to_lowercase(),
        (None, _) => name.to_string(),
    }
}

fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// A default function's value, as a person writes it in TOML.
fn default_value(body: &str) -> String {
    let b = body.replace(' ', "");
    let num = |s: &str| s.trim_end_matches(')').to_string();
    if let Some(n) = b.strip_prefix("Duration::from_secs(") {
        let n = num(n);
        return match n.parse::<u64>() {
            Ok(s) if s % 3600 == 0 && s > 0 => format!("\"{}h\"", s / 3600),
            Ok(s) if s % 60 == 0 && s > 0 => format!("\"{}m\"", s / 60),
            _ => format!("\"{n}s\""),
        };
    }
    if let Some(n) = b.strip_prefix("Duration::from_millis(") {
        return format!("\"{}ms\"", num(n));
    }
    if let Some(s) = b.strip_suffix(".into()").or_else(|| b.strip_suffix(".to_string()")) {
        return s.to_string();
    }
    if let Some(v) = b.rsplit("::").next().filter(|_| b.contains("::") && !b.contains('(')) {
        return format!("\"{}\"", snake(v));
    }
    b.replace('_', "")
}

fn parse() -> Source {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut defs = BTreeMap::new();
    let mut defaults = BTreeMap::new();
    // The config module's types first: a name defined there wins over the same name
    // elsewhere (only the types the config reaches are written out).
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("src").flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    files.sort_by_key(|p| (!p.starts_with(src.join("config")), p.clone()));
    for file in files {
        let stem = file.strip_prefix(&src).unwrap_or(&file).display().to_string();
        let text = std::fs::read_to_string(&file).expect("read");
        let ast = syn::parse_file(&text).expect("parse");
        for item in &ast.items {
            match item {
                Item::Struct(s) if !defs.contains_key(&s.ident.to_string()) => {
                    let serde = serde_of(&s.attrs);
                    let fields = named_fields(&s.fields, &stem);
                    defs.insert(
                        s.ident.to_string(),
                        Def::Struct {
                            doc: doc_of(&s.attrs),
                            fields,
                            from: serde.iter().find(|(n, _)| n == "from").map(|(_, v)| v.clone()),
                        },
                    );
                }
                Item::Enum(e) if !defs.contains_key(&e.ident.to_string()) => {
                    let serde = serde_of(&e.attrs);
                    let get = |k: &str| serde.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                    let variants = e
                        .variants
                        .iter()
                        .map(|v| {
                            let payload = match &v.fields {
                                Fields::Unnamed(u) if u.unnamed.len() == 1 => Payload::Type(u.unnamed[0].ty.clone()),
                                Fields::Named(_) => Payload::Fields(named_fields(&v.fields, &stem)),
                                _ => Payload::Unit,
                            };
                            let name = serde_of(&v.attrs)
                                .into_iter()
                                .find(|(n, _)| n == "rename")
                                .map_or(v.ident.to_string(), |(_, r)| format!("={r}"));
                            (name, doc_of(&v.attrs), payload)
                        })
                        .collect();
                    defs.insert(
                        e.ident.to_string(),
                        Def::Enum {
                            doc: doc_of(&e.attrs),
                            tag: get("tag"),
                            untagged: serde.iter().any(|(n, _)| n == "untagged"),
                            rename_all: get("rename_all"),
                            variants,
                            default: e
                                .variants
                                .iter()
                                .find(|v| v.attrs.iter().any(|a| a.path().is_ident("default")))
                                .map(|v| v.ident.to_string()),
                        },
                    );
                }
                Item::Fn(f) if f.sig.inputs.is_empty() => {
                    let body = f
                        .block
                        .stmts
                        .last()
                        .map(|s| s.to_token_stream().to_string())
                        .unwrap_or_default();
                    defaults.insert(format!("{stem}::{}", f.sig.ident), default_value(&body));
                }
                Item::Mod(m) if m.ident == "defaults" => {
                    for inner in m.content.iter().flat_map(|(_, items)| items) {
                        if let Item::Fn(f) = inner {
                            let body = f
                                .block
                                .stmts
                                .last()
                                .map(|s| s.to_token_stream().to_string())
                                .unwrap_or_default();
                            defaults.insert(format!("{stem}::{}", f.sig.ident), default_value(&body));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Source { defs, defaults }
}

/// The keys of a struct or a struct-like variant (`file`: where its `defaults::` are).
fn named_fields(fields: &Fields, file: &str) -> Vec<FieldDef> {
    let Fields::Named(named) = fields else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for f in &named.named {
        let attrs = serde_of(&f.attrs);
        if attrs.iter().any(|(n, _)| n == "skip" || n == "skip_deserializing") {
            continue;
        }
        let ident = f.ident.as_ref().map(|i| i.to_string()).unwrap_or_default();
        let key = attrs
            .iter()
            .find(|(n, _)| n == "rename")
            .map_or(ident.trim_start_matches("r#").to_string(), |(_, v)| v.clone());
        let default = attrs
            .iter()
            .find(|(n, _)| n == "default")
            .map(|(_, v)| match v.strip_prefix("defaults::") {
                Some(f) => format!("{file}::{f}"),
                None if !v.is_empty() && !v.contains("::") => format!("{file}::{v}"),
                None => v.clone(),
            });
        out.push(FieldDef {
            key,
            ty: f.ty.clone(),
            doc: doc_of(&f.attrs),
            default,
        });
    }
    out
}

/// The last path segment of `ty` and its generic arguments.
fn head(ty: &Type) -> (String, Vec<Type>) {
    let Type::Path(p) = ty else {
        return (ty.to_token_stream().to_string(), Vec::new());
    };
    let Some(seg) = p.path.segments.last() else {
        return (String::new(), Vec::new());
    };
    let args = match &seg.arguments {
        PathArguments::AngleBracketed(a) => a
            .args
            .iter()
            .filter_map(|g| match g {
                GenericArgument::Type(t) => Some(t.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    (seg.ident.to_string(), args)
}

struct Writer<'a> {
    src: &'a Source,
    out: String,
    undocumented: Vec<String>,
}

impl Writer<'_> {
    fn type_name(&self, ty: &Type) -> String {
        let (name, args) = head(ty);
        match (name.as_str(), args.as_slice()) {
            ("Option", [t]) => self.type_name(t),
            ("Vec", [t]) => format!("list of {}", self.type_name(t)),
            ("BTreeMap" | "HashMap", _) => "table".into(),
            ("String" | "Url", _) => "string".into(),
            ("PathBuf", _) => "path".into(),
            ("bool", _) => "bool".into(),
            ("Duration", _) => "duration".into(),
            ("u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64", _) => "integer".into(),
            ("f64" | "f32", _) => "number".into(),
            ("SecretString", _) => "secret (environment only)".into(),
            _ => match self.src.defs.get(&name) {
                Some(Def::Enum {
                    variants,
                    rename_all,
                    untagged: false,
                    tag: None,
                    ..
                }) if variants.iter().all(|v| matches!(v.2, Payload::Unit)) => variants
                    .iter()
                    .map(|(n, _, _)| format!("`{}`", variant_name(n, rename_all.as_deref())))
                    .collect::<Vec<_>>()
                    .join(", "),
                Some(Def::Enum {
                    variants,
                    untagged: true,
                    ..
                }) => variants
                    .iter()
                    .filter_map(|(_, _, p)| match p {
                        Payload::Type(t) => Some(self.type_name(t)),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join(", or "),
                _ => name,
            },
        }
    }

    /// The struct `ty` names (through Option and Vec), if it is a config section.
    fn section_of(&self, ty: &Type) -> Option<(String, bool)> {
        let (name, args) = head(ty);
        match (name.as_str(), args.as_slice()) {
            ("Option", [t]) => self.section_of(t),
            ("Vec", [t]) => self.section_of(t).map(|(n, _)| (n, true)),
            ("Url" | "Duration" | "PathBuf" | "SecretString" | "String", _) => None,
            _ => match self.src.defs.get(&name) {
                Some(Def::Struct { .. }) => Some((name, false)),
                Some(Def::Enum { tag: Some(_), .. }) => Some((name, false)),
                _ => None,
            },
        }
    }

    fn default_text(&self, f: &FieldDef) -> String {
        match f.default.as_deref() {
            None if head(&f.ty).0 == "Option" => "none".into(),
            None => "required".into(),
            Some("") => match head(&f.ty).0.as_str() {
                "bool" => "false".into(),
                "Vec" => "[]".into(),
                "Option" => "none".into(),
                "Duration" => "`\"0s\"`".into(),
                "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" => "`0`".into(),
                "String" => "`\"\"`".into(),
                "BTreeMap" | "HashMap" => "`{}`".into(),
                name => match self.src.defs.get(name) {
                    Some(Def::Enum {
                        default: Some(v),
                        rename_all,
                        ..
                    }) => format!("`\"{}\"`", variant_name(v, rename_all.as_deref())),
                    _ => "(built in)".into(),
                },
            },
            Some(path) => self
                .src
                .defaults
                .get(path)
                .map_or_else(|| "(built in)".into(), |v| format!("`{v}`")),
        }
    }

    /// A section's own keys in a table, then its sub-sections.
    fn keys(&mut self, path: &str, doc: &str, fields: &[FieldDef], depth: usize) {
        let (mut leaves, mut nested) = (Vec::new(), Vec::new());
        for f in fields {
            match self.section_of(&f.ty) {
                Some((n, list)) if !matches!(head(&f.ty).0.as_str(), "BTreeMap" | "HashMap") => {
                    nested.push((f, n, list))
                }
                _ => leaves.push(f),
            }
        }
        if !leaves.is_empty() || !doc.is_empty() {
            let _ = writeln!(self.out, "\n### `{}`\n", heading(path));
            if !doc.is_empty() {
                let _ = writeln!(self.out, "{doc}\n");
            }
        }
        if !leaves.is_empty() {
            let _ = writeln!(self.out, "| key | type | default | what it does |\n|---|---|---|---|");
            for f in leaves {
                if f.doc.is_empty() {
                    self.undocumented.push(format!("{}.{}", heading(path), f.key));
                }
                let _ = writeln!(
                    self.out,
                    "| `{}` | {} | {} | {} |",
                    f.key,
                    self.type_name(&f.ty),
                    self.default_text(f),
                    f.doc
                );
            }
        }
        for (f, n, list) in nested {
            if f.doc.is_empty() {
                self.undocumented.push(format!("{}.{}", heading(path), f.key));
            }
            // A sub-section of a variant keeps the variant at the end: `operators[].aggregates[]|kind = ...`.
            let (base, variant) = path.split_once('|').map_or((path, None), |(b, v)| (b, Some(v)));
            let mut sub = match base.is_empty() {
                true => f.key.clone(),
                false => format!("{base}.{}", f.key),
            };
            if list {
                sub.push_str("[]");
            }
            if let Some(v) = variant {
                sub = format!("{sub}|{v}");
            }
            self.section(&sub, &n, Some(&f.doc), depth + 1);
        }
    }

    fn section(&mut self, path: &str, name: &str, doc_override: Option<&str>, depth: usize) {
        if depth > 6 {
            return;
        }
        let Some(def) = self.src.defs.get(name) else {
            return;
        };
        match def {
            Def::Struct { doc, fields, from } => {
                if let Some(raw) = from {
                    let doc = doc_override.unwrap_or(doc).to_string();
                    return self.section(path, raw, Some(&doc), depth);
                }
                self.keys(path, doc_override.unwrap_or(doc), fields, depth);
            }
            Def::Enum {
                tag,
                variants,
                rename_all,
                doc,
                ..
            } => {
                let Some(tag) = tag else {
                    return;
                };
                let doc = doc_override.unwrap_or(doc);
                let _ = writeln!(self.out, "\n### `{}`\n\n{doc} Chosen by `{tag}`:", heading(path));
                for (v, vdoc, payload) in variants {
                    let value = variant_name(v, rename_all.as_deref());
                    let sub = format!("{path}|{tag} = \"{value}\"");
                    match payload {
                        Payload::Type(t) => {
                            if let Some((n, _)) = self.section_of(t) {
                                self.section(&sub, &n, Some(vdoc), depth + 1);
                            }
                        }
                        Payload::Fields(fields) => self.keys(&sub, vdoc, fields, depth),
                        Payload::Unit => {
                            let _ = writeln!(self.out, "\n### `{}`\n\n{vdoc}", heading(&sub));
                        }
                    }
                }
            }
        }
    }
}

/// How a section is written in TOML: `[sink.kafka]`, `[[operators]]`, `[[operators]]
/// kind = "window"`, `[[operators]].assigner`.
fn heading(path: &str) -> String {
    let (path, variant) = path.split_once('|').map_or((path, None), |(p, v)| (p, Some(v)));
    let text = match path.split_once("[]") {
        // `operators[].aggregates[]`: entries of a list inside a list's entry.
        Some((list, rest)) if !rest.is_empty() => {
            format!("[[{list}]] → {}", rest.trim_start_matches('.').trim_end_matches("[]"))
        }
        Some((list, _)) => format!("[[{list}]]"),
        None => format!("[{path}]"),
    };
    match variant {
        Some(v) => format!("{text} ({v})"),
        None => text,
    }
}

fn generate() -> (String, Vec<String>) {
    let src = parse();
    let mut w = Writer {
        src: &src,
        out: String::from(
            "# Configuration reference\n\n\
             Generated from the config types' doc comments (`src/config/*.rs`) by `scripts/config-reference`;\n\
             CI fails when this file is stale or a key has no doc comment. Every key can also be set in the\n\
             environment: `SLUICE__SECTION__KEY` (e.g. `SLUICE__SINK__URL`; a list comma-separated). Secrets\n\
             (passwords, tokens) are refused in the file and read from the environment only. The guide to\n\
             these keys is [configuration.md](configuration.md).\n",
        ),
        undocumented: Vec::new(),
    };
    w.section("", "JobConfig", Some(""), 0);
    (w.out, w.undocumented)
}

#[test]
fn the_configuration_reference_is_generated_from_the_config_types() {
    let (text, undocumented) = generate();
    assert!(
        undocumented.is_empty(),
        "config keys without a doc comment (document them in src/config): {undocumented:?}"
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration-reference.md");
    if std::env::var_os("SLUICE_WRITE_DOCS").is_some() {
        std::fs::write(&path, &text).expect("write the reference");
        return;
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == text,
        "docs/configuration-reference.md is stale: run scripts/config-reference (it differs from what the config types say)"
    );
    for key in [
        "`bootstrap_servers`",
        "`[checkpoint]`",
        "`interval`",
        "`strategy`",
        "`lease_ttl`",
    ] {
        assert!(text.contains(key), "{key} is missing from the reference");
    }
}
