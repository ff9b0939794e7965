use std::str::FromStr;

/// A plugin's `key = value` settings (from the run's `training_plugin_config`), with helpers
/// that name the key in every error.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings(pub Vec<(String, String)>);

impl Settings {
    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `key` parsed as `T`, or `default` when it is not set. The error names the key and value.
    pub fn parse_or<T: FromStr>(&self, key: &str, default: T) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|e| format!("setting `{key}` = `{v}` is not valid: {e}")),
        }
    }

    /// Refuses any key not in `known`, so a misspelt setting is never silently ignored.
    pub fn allow_only(&self, known: &[&str]) -> Result<(), String> {
        for (k, _) in &self.0 {
            if !known.contains(&k.as_str()) {
                return Err(format!(
                    "unknown setting `{k}`; this plugin accepts: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ));
            }
        }
        Ok(())
    }
}
