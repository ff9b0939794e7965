//! Parquet and Arrow IPC files → JSON records.

use lora_api::RawRecord;

use crate::error::{DataError, Result};
use crate::source::{DataFile, ReadProblem};

pub(crate) fn read_columnar(
    file: &DataFile,
    _source: &str,
    _sink: &mut dyn FnMut(std::result::Result<RawRecord, ReadProblem>) -> Result<()>,
) -> Result<()> {
    Err(DataError::format(&file.path, "Parquet/Arrow datasets are not readable in this build yet; convert to JSONL"))
}
