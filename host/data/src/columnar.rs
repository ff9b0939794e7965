//! Parquet and Arrow IPC files (`datasets.save_to_disk` writes Arrow streams) → one JSON record
//! per row. Only the column types datasets use for text data are converted (strings, numbers,
//! booleans, nulls, lists, structs); another type is a clear error naming the file and column.

use std::fs::File;
use std::io::Read;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{ArrowError, DataType};
use lora_api::RawRecord;
use serde_json::Value;

use crate::error::{DataError, Result};
use crate::source::{DataFile, FileKind, ReadProblem};

fn float(v: f64) -> Value {
    serde_json::Number::from_f64(v)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// The JSON value of row `i` of `col`.
fn value_at(col: &dyn Array, i: usize) -> std::result::Result<Value, String> {
    if col.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match col.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(col.as_boolean().value(i)),
        DataType::Int8 => col.as_primitive::<Int8Type>().value(i).into(),
        DataType::Int16 => col.as_primitive::<Int16Type>().value(i).into(),
        DataType::Int32 => col.as_primitive::<Int32Type>().value(i).into(),
        DataType::Int64 => col.as_primitive::<Int64Type>().value(i).into(),
        DataType::UInt8 => col.as_primitive::<UInt8Type>().value(i).into(),
        DataType::UInt16 => col.as_primitive::<UInt16Type>().value(i).into(),
        DataType::UInt32 => col.as_primitive::<UInt32Type>().value(i).into(),
        DataType::UInt64 => col.as_primitive::<UInt64Type>().value(i).into(),
        DataType::Float32 => float(col.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => float(col.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => Value::String(col.as_string::<i32>().value(i).to_owned()),
        DataType::LargeUtf8 => Value::String(col.as_string::<i64>().value(i).to_owned()),
        DataType::Utf8View => Value::String(col.as_string_view().value(i).to_owned()),
        DataType::List(_) => list(col.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(col.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(_, _) => list(col.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = col.as_struct();
            let mut obj = serde_json::Map::with_capacity(fields.len());
            for (k, f) in fields.iter().enumerate() {
                obj.insert(f.name().clone(), value_at(s.column(k).as_ref(), i)?);
            }
            Value::Object(obj)
        }
        other => {
            return Err(format!(
                "column type {other} is not supported (strings, numbers, booleans, lists and structs are)"
            ));
        }
    })
}

fn list(values: &dyn Array) -> std::result::Result<Value, String> {
    (0..values.len())
        .map(|j| value_at(values, j))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn emit_batch(
    batch: &RecordBatch,
    file: &DataFile,
    source: &str,
    next_index: &mut u64,
    sink: &mut dyn FnMut(std::result::Result<RawRecord, ReadProblem>) -> Result<()>,
) -> Result<()> {
    let schema = batch.schema();
    for row in 0..batch.num_rows() {
        let mut obj = serde_json::Map::with_capacity(batch.num_columns());
        for (c, field) in schema.fields().iter().enumerate() {
            let v = value_at(batch.column(c).as_ref(), row).map_err(|m| {
                DataError::format(&file.path, format!("column `{}`: {m}", field.name()))
            })?;
            obj.insert(field.name().clone(), v);
        }
        *next_index += 1;
        sink(Ok(RawRecord {
            index: *next_index,
            source: source.to_owned(),
            value: Value::Object(obj),
            json: None,
        }))?;
    }
    Ok(())
}

fn arrow_err(file: &DataFile, what: &str, e: impl std::fmt::Display) -> DataError {
    let msg = e.to_string();
    let hint = if msg.contains("Disabled feature")
        || msg.contains("not supported") && msg.contains("codec")
    {
        " (this build reads uncompressed and Snappy-compressed files; rewrite it with Snappy, pyarrow's default, or as JSONL)"
    } else {
        ""
    };
    DataError::format(&file.path, format!("{what}: {msg}{hint}"))
}

pub(crate) fn read_columnar(
    file: &DataFile,
    source: &str,
    sink: &mut dyn FnMut(std::result::Result<RawRecord, ReadProblem>) -> Result<()>,
) -> Result<()> {
    let open = || File::open(&file.path).map_err(|e| DataError::io("open", &file.path, e));
    let mut index = 0u64;
    match file.kind {
        FileKind::Parquet => {
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(open()?)
                    .map_err(|e| arrow_err(file, "not a readable Parquet file", e))?
                    .build()
                    .map_err(|e| arrow_err(file, "cannot read Parquet", e))?;
            for batch in reader {
                let batch = batch.map_err(|e| arrow_err(file, "cannot read Parquet rows", e))?;
                emit_batch(&batch, file, source, &mut index, sink)?;
            }
        }
        FileKind::Arrow => {
            // The Arrow IPC file format starts with "ARROW1"; datasets writes the stream format.
            let mut magic = [0u8; 6];
            let is_file_format = open()?.read_exact(&mut magic).is_ok() && &magic == b"ARROW1";
            let batches: Box<dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>>> =
                if is_file_format {
                    Box::new(
                        arrow_ipc::reader::FileReader::try_new(open()?, None)
                            .map_err(|e| arrow_err(file, "not a readable Arrow file", e))?,
                    )
                } else {
                    Box::new(
                        arrow_ipc::reader::StreamReader::try_new(
                            std::io::BufReader::new(open()?),
                            None,
                        )
                        .map_err(|e| arrow_err(file, "not a readable Arrow stream", e))?,
                    )
                };
            for batch in batches {
                let batch = batch.map_err(|e| arrow_err(file, "cannot read Arrow rows", e))?;
                emit_batch(&batch, file, source, &mut index, sink)?;
            }
        }
        FileKind::Jsonl | FileKind::Json => unreachable_kind(file)?,
    }
    Ok(())
}

fn unreachable_kind(file: &DataFile) -> Result<()> {
    Err(DataError::format(
        &file.path,
        "internal: a JSON file was sent to the columnar reader",
    ))
}
