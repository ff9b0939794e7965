//! How one parameter's Rust type maps to JSON, to text (CLI and environment) and to KFP.

use serde_json::Value;

/// The value kind of a parameter, as KFP and JSON Schema see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Int,
    Float,
    Bool,
    /// A JSON object (`kubernetes_config`, a `dsl.TaskConfig` in the reference).
    TaskConfig,
}

impl Kind {
    /// The KFP IR `parameterType`.
    pub fn kfp_type(self) -> &'static str {
        match self {
            Kind::Str => "STRING",
            Kind::Int => "NUMBER_INTEGER",
            Kind::Float => "NUMBER_DOUBLE",
            Kind::Bool => "BOOLEAN",
            Kind::TaskConfig => "TASK_CONFIG",
        }
    }

    /// The JSON Schema `type`.
    pub fn json_type(self) -> &'static str {
        match self {
            Kind::Str => "string",
            Kind::Int => "integer",
            Kind::Float => "number",
            Kind::Bool => "boolean",
            Kind::TaskConfig => "object",
        }
    }

    /// The Python annotation of the reference component (for help text and docs).
    pub fn python_type(self) -> &'static str {
        match self {
            Kind::Str => "str",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Bool => "bool",
            Kind::TaskConfig => "dsl.TaskConfig",
        }
    }

    /// What a value of this kind looks like, for error messages.
    pub fn expected(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::Int => "an integer",
            Kind::Float => "a number",
            Kind::Bool => "true or false",
            Kind::TaskConfig => "a JSON object",
        }
    }
}

/// A Rust type a parameter can have. `Err` carries a short reason ("expected an integer").
pub trait ParamValue: Sized {
    const KIND: Kind;
    const OPTIONAL: bool = false;
    fn from_json(v: &Value) -> Result<Self, String>;
    /// From command-line or environment text.
    fn from_text(s: &str) -> Result<Self, String>;
    fn to_json(&self) -> Value;
}

fn got(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(57).map_or(s.len(), |c| c.0)]
        )
    } else {
        s
    }
}

impl ParamValue for String {
    const KIND: Kind = Kind::Str;
    fn from_json(v: &Value) -> Result<Self, String> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("expected a string, got {}", got(v)))
    }
    fn from_text(s: &str) -> Result<Self, String> {
        Ok(s.to_owned())
    }
    fn to_json(&self) -> Value {
        Value::String(self.clone())
    }
}

impl ParamValue for i64 {
    const KIND: Kind = Kind::Int;
    fn from_json(v: &Value) -> Result<Self, String> {
        if let Some(i) = v.as_i64() {
            return Ok(i);
        }
        // The KFP launcher and the SDK write integer defaults as `128.0`.
        match v.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
            _ => Err(format!("expected an integer, got {}", got(v))),
        }
    }
    fn from_text(s: &str) -> Result<Self, String> {
        s.trim()
            .parse()
            .map_err(|_| format!("expected an integer, got {s:?}"))
    }
    fn to_json(&self) -> Value {
        Value::from(*self)
    }
}

impl ParamValue for f64 {
    const KIND: Kind = Kind::Float;
    fn from_json(v: &Value) -> Result<Self, String> {
        v.as_f64()
            .ok_or_else(|| format!("expected a number, got {}", got(v)))
    }
    fn from_text(s: &str) -> Result<Self, String> {
        match s.trim().parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(f),
            _ => Err(format!("expected a finite number, got {s:?}")),
        }
    }
    fn to_json(&self) -> Value {
        serde_json::Number::from_f64(*self).map_or(Value::Null, Value::Number)
    }
}

impl ParamValue for bool {
    const KIND: Kind = Kind::Bool;
    fn from_json(v: &Value) -> Result<Self, String> {
        v.as_bool()
            .ok_or_else(|| format!("expected true or false, got {}", got(v)))
    }
    fn from_text(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(format!("expected true or false, got {s:?}")),
        }
    }
    fn to_json(&self) -> Value {
        Value::Bool(*self)
    }
}

impl ParamValue for serde_json::Map<String, Value> {
    const KIND: Kind = Kind::TaskConfig;
    fn from_json(v: &Value) -> Result<Self, String> {
        v.as_object()
            .cloned()
            .ok_or_else(|| format!("expected a JSON object, got {}", got(v)))
    }
    fn from_text(s: &str) -> Result<Self, String> {
        let v: Value =
            serde_json::from_str(s).map_err(|e| format!("expected a JSON object: {e}"))?;
        Self::from_json(&v)
    }
    fn to_json(&self) -> Value {
        Value::Object(self.clone())
    }
}

/// Unset optional values: JSON `null` (or absent), and the text `none`/`null` (`--training-seed none`).
impl<T: ParamValue> ParamValue for Option<T> {
    const KIND: Kind = T::KIND;
    const OPTIONAL: bool = true;
    fn from_json(v: &Value) -> Result<Self, String> {
        if v.is_null() {
            Ok(None)
        } else {
            T::from_json(v).map(Some)
        }
    }
    fn from_text(s: &str) -> Result<Self, String> {
        match s.trim() {
            "none" | "None" | "null" => Ok(None),
            _ => T::from_text(s).map(Some),
        }
    }
    fn to_json(&self) -> Value {
        self.as_ref().map_or(Value::Null, T::to_json)
    }
}
