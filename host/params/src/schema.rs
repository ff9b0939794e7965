//! Documents generated from the definition table: JSON Schema and a Markdown table.

use serde_json::{Map, Value, json};

use crate::defs::{Origin, PARAMS};

/// A JSON Schema (draft 2020-12) of a params file / the parameter set.
pub fn json_schema() -> Value {
    let mut props = Map::new();
    for d in PARAMS {
        let ty = if d.optional {
            json!([d.kind.json_type(), "null"])
        } else {
            json!(d.kind.json_type())
        };
        let mut p = Map::new();
        p.insert("type".into(), ty);
        p.insert("default".into(), d.default_json());
        p.insert("description".into(), Value::String(d.help.to_owned()));
        p.insert("x-env".into(), Value::String(d.env_var()));
        p.insert("x-flag".into(), Value::String(format!("--{}", d.flag())));
        if d.origin == Origin::Addition {
            p.insert("x-addition".into(), Value::Bool(true));
        }
        props.insert(d.name.to_owned(), Value::Object(p));
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/lora-rs/lora/params.schema.json",
        "title": "lora parameters",
        "description": "Parameters of the lora step (the Kubeflow Pipelines lora component's, plus additions marked x-addition). Unset optional values resolve to training_hub's defaults.",
        "type": "object",
        "additionalProperties": false,
        "properties": props,
    })
}

/// The parameter table as Markdown (README).
pub fn markdown_table() -> String {
    let mut s = String::from("| Parameter | Type | Default | Description |\n|---|---|---|---|\n");
    for d in PARAMS {
        let ty = if d.optional {
            format!("Optional[{}]", d.kind.python_type())
        } else {
            d.kind.python_type().to_owned()
        };
        let default = d.default_display();
        s.push_str(&format!(
            "| `{}` | `{}` | `{}` | {} |\n",
            d.name,
            ty,
            default,
            d.help.replace('|', "\\|")
        ));
    }
    s
}
