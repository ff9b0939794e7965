//! A preprocessor that claims the plugin API `lora:plugin@0.2.0`, newer than any host supports
//! today: the host must refuse it by name before running any of its code.

wit_bindgen::generate!({
    inline: r#"
        package lora:plugin@0.2.0;
        interface preprocess {
            /// Same shape as 0.1.0's first call, under a newer version.
            configure: func(settings: list<tuple<string, string>>) -> result<_, string>;
        }
        world preprocessor {
            export preprocess;
        }
    "#,
});

struct Newer;

impl exports::lora::plugin::preprocess::Guest for Newer {
    fn configure(_settings: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }
}

export!(Newer);
