//! Reading parameter values from their sources, in precedence order:
//! defaults < params file < environment < command line < KFP executor input.
//! Every problem is collected (never the first only); each value's source is recorded.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::defs::{PARAMS, Params, param_def};
use crate::error::{ParamError, ParamErrors, Source};
use crate::resolve::ResolvedParams;

/// Collects parameter values from their sources. Apply sources lowest precedence first, then
/// [`Loader::finish`] validates and resolves.
#[derive(Debug, Clone)]
pub struct Loader {
    params: Params,
    sources: BTreeMap<&'static str, Source>,
    errors: Vec<ParamError>,
}

impl Default for Loader {
    fn default() -> Self {
        Self::new()
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        v => v.to_string(),
    }
}

impl Loader {
    pub fn new() -> Self {
        let sources = PARAMS.iter().map(|d| (d.name, Source::Default)).collect();
        Loader {
            params: Params::default(),
            sources,
            errors: Vec::new(),
        }
    }

    fn set_json(&mut self, name: &str, v: &Value, source: Source) {
        let Some(def) = param_def(name) else {
            self.unknown(name, source);
            return;
        };
        match self.params.set_json(def.name, v) {
            Ok(()) => {
                self.sources.insert(def.name, source);
            }
            Err(msg) => self.errors.push(ParamError {
                param: def.name.into(),
                value: show(v),
                source,
                message: msg,
            }),
        }
    }

    fn unknown(&mut self, name: &str, source: Source) {
        let path_flag = ["pvc_path", "dataset", "output_model", "output_metrics", "output_loss_chart"]
            .contains(&name)
            .then(|| format!("`{name}` is an input/output path, not a training parameter: give it as --{} (or through KFP)", name.replace('_', "-")));
        let hint = match path_flag
            .or_else(|| suggest(name).map(|s| format!("unknown parameter; did you mean `{s}`?")))
        {
            Some(h) => h,
            None => "unknown parameter (`lora params --json-schema` lists them all)".to_owned(),
        };
        self.errors.push(ParamError {
            param: name.into(),
            value: String::new(),
            source,
            message: hint,
        });
    }

    /// A params file: a JSON or YAML object with snake_case parameter names as keys.
    /// YAML is assumed unless the file name ends in `.json`.
    pub fn apply_file(&mut self, path: &Path) -> &mut Self {
        let source = Source::File {
            path: path.to_path_buf(),
        };
        let file_err = |message: String| ParamError {
            param: "--params".into(),
            value: path.display().to_string(),
            source: Source::Default,
            message,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.errors
                    .push(file_err(format!("cannot read the params file: {e}")));
                return self;
            }
        };
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let parsed: Result<Value, String> = if is_json {
            serde_json::from_str(&text).map_err(|e| format!("not valid JSON: {e}"))
        } else {
            serde_yaml::from_str(&text).map_err(|e| format!("not valid YAML: {e}"))
        };
        match parsed {
            Ok(Value::Object(map)) => {
                for (k, v) in &map {
                    self.set_json(k, v, source.clone());
                }
            }
            Ok(Value::Null) => {} // an empty file sets nothing
            Ok(other) => self.errors.push(file_err(format!(
                "must be an object of parameter names to values, got {}",
                kind_of(&other)
            ))),
            Err(m) => self.errors.push(file_err(m)),
        }
        self
    }

    /// Environment variables `LORA_<UPPER_SNAKE_NAME>`. Other `LORA_*` variables are not ours to
    /// judge, except `LORA_TRAINING_*` ones, which must name a parameter.
    pub fn apply_env<I, K, V>(&mut self, vars: I) -> &mut Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
            .collect();
        vars.sort();
        for (var, val) in vars {
            let Some(rest) = var.strip_prefix("LORA_") else {
                continue;
            };
            let name = rest.to_ascii_lowercase();
            let source = Source::Env { var: var.clone() };
            match param_def(&name) {
                Some(def) => self.set_text(def.name, &val, source),
                None if name.starts_with("training_") || name == "kubernetes_config" => {
                    self.unknown(&name, source)
                }
                None => {}
            }
        }
        self
    }

    fn set_text(&mut self, name: &'static str, raw: &str, source: Source) {
        match self.params.set_text(name, raw) {
            Ok(()) => {
                self.sources.insert(name, source);
            }
            Err(msg) => self.errors.push(ParamError {
                param: name.into(),
                value: format!("{raw:?}"),
                source,
                message: msg,
            }),
        }
    }

    /// A command-line value for parameter `name` (snake_case).
    pub fn apply_cli(&mut self, name: &str, raw: &str) -> &mut Self {
        match param_def(name) {
            Some(def) => self.set_text(
                def.name,
                raw,
                Source::Cli {
                    flag: format!("--{}", def.flag()),
                },
            ),
            None => self.unknown(
                name,
                Source::Cli {
                    flag: format!("--{}", name.replace('_', "-")),
                },
            ),
        }
        self
    }

    /// The KFP executor input's `inputs.parameterValues` (minus `pvc_path`, which is an input
    /// path, not a training parameter). `null` means unset.
    pub fn apply_kfp(&mut self, values: &Map<String, Value>) -> &mut Self {
        for (k, v) in values {
            self.set_json(k, v, Source::Kfp);
        }
        self
    }

    /// The values collected so far (unvalidated).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Validates everything and resolves training_hub defaults, reporting every problem at once.
    pub fn finish(self) -> Result<ResolvedParams, ParamErrors> {
        let world = crate::resolve::launched_world_size().unwrap_or(1) as u64;
        self.finish_for_world(world)
    }

    /// [`Loader::finish`] for a run of `world_size` data-parallel processes (see
    /// [`crate::resolve_for_world`]).
    pub fn finish_for_world(self, world_size: u64) -> Result<ResolvedParams, ParamErrors> {
        self.finish_with(|params, sources| crate::resolve::resolve_for_world(params, sources, world_size))
    }

    /// [`Loader::finish`] in `lora kfp` launching a TrainJob (see
    /// [`crate::resolve_for_trainjob_launcher`]).
    pub fn finish_for_trainjob_launcher(self) -> Result<ResolvedParams, ParamErrors> {
        self.finish_with(crate::resolve::resolve_for_trainjob_launcher)
    }

    fn finish_with(
        self,
        resolve: impl FnOnce(Params, BTreeMap<&'static str, Source>) -> Result<ResolvedParams, ParamErrors>,
    ) -> Result<ResolvedParams, ParamErrors> {
        let Loader {
            params,
            sources,
            mut errors,
        } = self;
        match resolve(params, sources) {
            Ok(r) if errors.is_empty() => Ok(r),
            Ok(_) => Err(ParamErrors(errors)),
            Err(ParamErrors(more)) => {
                errors.extend(more);
                Err(ParamErrors(errors))
            }
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The closest parameter name to `name`, if one is close enough to be a typo.
pub fn suggest(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase().replace('-', "_");
    let (best, dist) = PARAMS
        .iter()
        .map(|d| (d.name, edit_distance(&name, d.name)))
        .chain(PARAMS.iter().filter_map(|d| {
            // `lora_r` for `training_lora_r`: a missing prefix is a common slip.
            d.name
                .strip_prefix("training_")
                .map(|short| (d.name, edit_distance(&name, short)))
        }))
        .min_by_key(|&(_, d)| d)?;
    (dist <= (name.len() / 3).max(2)).then_some(best)
}

/// Levenshtein distance.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
