//! A part file being written: rows in Parquet (columns typed from the stream's schema,
//! row groups of `sink.files.row_group_rows`, Snappy) or JSON lines, in memory until
//! the file is closed and staged.

use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::config::FileFormat;
use crate::error::{Error, Result};
use crate::record::{DeadLetter, Record, Value, ValueSource};
use crate::sink::json::write_value;
use crate::sink::{Column, ValueType};

/// The columns a part file holds (the sink's, less those its directories name), and
/// how it is written.
#[derive(Debug)]
pub struct FileSchema {
    /// Columns, in order.
    pub columns: Vec<Column>,
    /// The Arrow schema of a Parquet file.
    pub arrow: SchemaRef,
    /// Parquet or JSON lines.
    pub format: FileFormat,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
}

impl FileSchema {
    /// The file schema of `columns`.
    pub fn new(columns: Vec<Column>, format: FileFormat, row_group_rows: usize) -> Self {
        let fields: Vec<Field> = columns
            .iter()
            .map(|c| Field::new(&c.name, data_type(c), true))
            .collect();
        Self {
            columns,
            arrow: Arc::new(Schema::new(fields)),
            format,
            row_group_rows,
        }
    }

    /// The file name's extension.
    pub fn extension(&self) -> &'static str {
        match self.format {
            FileFormat::Parquet => "parquet",
            FileFormat::Jsonl => "jsonl",
        }
    }
}

fn data_type(c: &Column) -> DataType {
    match c.value_type {
        ValueType::Text | ValueType::Json => DataType::Utf8,
        ValueType::Int4 => DataType::Int32,
        ValueType::Int8 => DataType::Int64,
        ValueType::Float8 => DataType::Float64,
        ValueType::Bool => DataType::Boolean,
    }
}

/// One part file being written.
pub struct PartFile {
    schema: Arc<FileSchema>,
    body: Body,
    rows: u64,
}

enum Body {
    Parquet {
        writer: Box<ArrowWriter<Vec<u8>>>,
        /// Rows not yet in a row group.
        pending: Vec<Record>,
    },
    Jsonl(Vec<u8>),
}

impl PartFile {
    /// An empty part file.
    pub fn new(schema: Arc<FileSchema>) -> Result<Self> {
        let body = match schema.format {
            FileFormat::Parquet => {
                let props = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .set_max_row_group_row_count(Some(schema.row_group_rows))
                    .build();
                let writer =
                    ArrowWriter::try_new(Vec::new(), schema.arrow.clone(), Some(props)).map_err(parquet_error)?;
                Body::Parquet {
                    writer: Box::new(writer),
                    pending: Vec::new(),
                }
            }
            FileFormat::Jsonl => Body::Jsonl(Vec::new()),
        };
        Ok(Self { schema, body, rows: 0 })
    }

    /// Rows in the file so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes written so far (of Parquet: the closed row groups, and an estimate of the
    /// open one).
    pub fn bytes(&self) -> u64 {
        match &self.body {
            Body::Parquet { writer, pending } => {
                (writer.bytes_written() + writer.in_progress_size()) as u64 + pending.len() as u64 * 64
            }
            Body::Jsonl(buf) => buf.len() as u64,
        }
    }

    /// Add a row.
    pub fn push(&mut self, r: Record) -> Result<()> {
        self.rows += 1;
        match &mut self.body {
            Body::Parquet { writer, pending } => {
                pending.push(r);
                if pending.len() >= self.schema.row_group_rows.min(8_192) {
                    let batch = record_batch(&self.schema, pending)?;
                    pending.clear();
                    writer.write(&batch).map_err(parquet_error)?;
                }
            }
            Body::Jsonl(buf) => {
                buf.push(b'{');
                for (i, c) in self.schema.columns.iter().enumerate() {
                    if i > 0 {
                        buf.push(b',');
                    }
                    // A column name is a plain identifier: no escaping needed.
                    buf.push(b'"');
                    buf.extend_from_slice(c.name.as_bytes());
                    buf.extend_from_slice(b"\":");
                    write_value(c.source, &r, buf);
                }
                buf.extend_from_slice(b"}\n");
            }
        }
        Ok(())
    }

    /// Add the rows of a closed file of the same schema (its bytes as
    /// [`PartFile::finish`] gave them): merging small files into one.
    pub fn append_file(&mut self, bytes: Vec<u8>, rows: u64) -> Result<()> {
        self.rows += rows;
        match &mut self.body {
            Body::Parquet { writer, pending } => {
                if !pending.is_empty() {
                    let batch = record_batch(&self.schema, pending)?;
                    pending.clear();
                    writer.write(&batch).map_err(parquet_error)?;
                }
                let reader =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
                        .and_then(|b| b.build())
                        .map_err(parquet_error)?;
                for batch in reader {
                    let batch = batch.map_err(|e| Error::Sink {
                        target: "files",
                        message: format!("read back a staged part file: {e}"),
                    })?;
                    writer.write(&batch).map_err(parquet_error)?;
                }
            }
            Body::Jsonl(buf) => buf.extend_from_slice(&bytes),
        }
        Ok(())
    }

    /// Close the file: its bytes.
    pub fn finish(self) -> Result<Vec<u8>> {
        match self.body {
            Body::Parquet { writer, pending } => {
                let mut writer = *writer;
                if !pending.is_empty() {
                    let batch = record_batch(&self.schema, &pending)?;
                    writer.write(&batch).map_err(parquet_error)?;
                }
                writer.into_inner().map_err(parquet_error)
            }
            Body::Jsonl(buf) => Ok(buf),
        }
    }
}

/// A dead letter as a JSON line: its origin, reason and payload (as text when it is
/// UTF-8, else base64 under `payload_base64`).
pub fn dead_letter_line(d: &DeadLetter, out: &mut Vec<u8>) {
    let mut line = serde_json::json!({
        "topic": &*d.origin.topic,
        "partition": d.origin.partition,
        "offset": d.origin.offset,
        "kafka_timestamp": d.origin.timestamp_ms,
        "reason": d.reason,
    });
    match std::str::from_utf8(&d.payload) {
        Ok(text) => line["payload"] = text.into(),
        Err(_) => {
            use base64::Engine as _;
            line["payload_base64"] = base64::engine::general_purpose::STANDARD.encode(&d.payload).into();
        }
    }
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

fn parquet_error(e: parquet::errors::ParquetError) -> Error {
    Error::Sink {
        target: "files",
        message: format!("parquet: {e}"),
    }
}

/// The rows as an Arrow batch of the file's schema.
fn record_batch(schema: &FileSchema, rows: &[Record]) -> Result<RecordBatch> {
    let arrays: Vec<ArrayRef> = schema.columns.iter().map(|c| column(c, rows)).collect();
    RecordBatch::try_new(schema.arrow.clone(), arrays).map_err(|e| Error::Sink {
        target: "files",
        message: format!("arrow: {e}"),
    })
}

/// A column's value in one record, borrowed.
enum Cell<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(&'a str),
}

fn cell<'a>(c: &Column, r: &'a Record) -> Cell<'a> {
    match c.source {
        ValueSource::Topic => Cell::Text(&r.origin.topic),
        ValueSource::Partition => Cell::Int(i64::from(r.origin.partition)),
        ValueSource::Offset => Cell::Int(r.origin.offset),
        ValueSource::Timestamp => Cell::Int(r.origin.timestamp_ms),
        ValueSource::Payload => r.payload.as_deref().map_or(Cell::Null, Cell::Text),
        ValueSource::Field(i) => match r.values.get(i) {
            Some(Value::Bool(b)) => Cell::Bool(*b),
            Some(Value::Int(n)) => Cell::Int(*n),
            Some(Value::Float(f)) => Cell::Float(*f),
            Some(Value::Text(t) | Value::Json(t)) => Cell::Text(t),
            Some(Value::Null) | None => Cell::Null,
        },
    }
}

fn column(c: &Column, rows: &[Record]) -> ArrayRef {
    match c.value_type {
        ValueType::Text | ValueType::Json => {
            let mut b = StringBuilder::with_capacity(rows.len(), rows.len() * 16);
            for r in rows {
                match cell(c, r) {
                    Cell::Text(s) => b.append_value(s),
                    Cell::Null => b.append_null(),
                    Cell::Bool(v) => b.append_value(v.to_string()),
                    Cell::Int(v) => b.append_value(v.to_string()),
                    Cell::Float(v) => b.append_value(v.to_string()),
                }
            }
            Arc::new(b.finish())
        }
        ValueType::Int4 => {
            let mut b = Int32Builder::with_capacity(rows.len());
            for r in rows {
                match cell(c, r) {
                    Cell::Int(v) => b.append_option(i32::try_from(v).ok()),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
        ValueType::Int8 => {
            let mut b = Int64Builder::with_capacity(rows.len());
            for r in rows {
                match cell(c, r) {
                    Cell::Int(v) => b.append_value(v),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
        ValueType::Float8 => {
            let mut b = Float64Builder::with_capacity(rows.len());
            for r in rows {
                match cell(c, r) {
                    Cell::Float(v) => b.append_value(v),
                    Cell::Int(v) => b.append_value(v as f64),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
        ValueType::Bool => {
            let mut b = BooleanBuilder::with_capacity(rows.len());
            for r in rows {
                match cell(c, r) {
                    Cell::Bool(v) => b.append_value(v),
                    _ => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
    }
}

/// The directory part of a row for a column (`country=DE`): the value's text with the
/// characters a path or Hive reserves escaped as `%XX`; null is Hive's default
/// partition.
pub fn partition_value(c: &Column, r: &Record) -> String {
    let text = match cell(c, r) {
        Cell::Null => return "__HIVE_DEFAULT_PARTITION__".into(),
        Cell::Text(s) => s.to_string(),
        Cell::Bool(v) => v.to_string(),
        Cell::Int(v) => v.to_string(),
        Cell::Float(v) => v.to_string(),
    };
    if text.is_empty() {
        return "__HIVE_DEFAULT_PARTITION__".into();
    }
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        if ch.is_control()
            || matches!(
                ch,
                '/' | '\\' | '=' | '%' | ':' | '"' | '#' | '?' | '*' | '[' | ']' | '^' | '{' | '}'
            )
            || (out.is_empty() && ch == '.')
        {
            let mut buf = [0u8; 4];
            for b in ch.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(ch);
        }
    }
    out
}
