//! Request defaults a model recommends: the sampling fields of a Hugging Face directory's
//! `generation_config.json`, used for requests that leave them out, as vLLM does by default
//! (`--generation-config auto`). Only the fields vLLM takes: `temperature`, `top_p`, `top_k`,
//! `min_p` and `repetition_penalty` (like vLLM, `do_sample` is not read).

use serde_json::Value;

use super::sampling_fields::{sampling_params, SamplingFields};

/// Sets one field from its JSON value (`None`: not a number of the field's kind).
type SetField = fn(&mut SamplingDefaults, &Value) -> Option<()>;

/// The `generation_config.json` keys read, in vLLM's order.
const FIELDS: [(&str, SetField); 5] = [
    ("temperature", |d, v| {
        v.as_f64().map(|x| d.temperature = Some(x))
    }),
    ("top_p", |d, v| v.as_f64().map(|x| d.top_p = Some(x))),
    ("top_k", |d, v| v.as_i64().map(|x| d.top_k = Some(x))),
    ("min_p", |d, v| v.as_f64().map(|x| d.min_p = Some(x))),
    ("repetition_penalty", |d, v| {
        v.as_f64().map(|x| d.repetition_penalty = Some(x))
    }),
];

/// Defaults for a request's sampling fields; all `None`: the API's own defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
}

impl SamplingDefaults {
    /// The defaults in a `generation_config.json` document, and why each value left out was
    /// left out (one a request could not send, such as `temperature: 5`, or not a number).
    pub fn from_generation_config(config: &Value) -> (SamplingDefaults, Vec<String>) {
        let mut defaults = SamplingDefaults::default();
        let mut refused = Vec::new();
        for (key, set) in FIELDS {
            let Some(value) = config.get(key).filter(|v| !v.is_null()) else {
                continue;
            };
            let mut with = defaults.clone();
            if set(&mut with, value).is_none() {
                refused.push(format!("`{key}` is {value}, not a number"));
                continue;
            }
            // The request's own check (field by field, and the fields taken so far pass it): a
            // default no request could send is not taken.
            match sampling_params(&SamplingFields::default().or(&with), None) {
                Ok(_) => defaults = with,
                Err(e) => refused.push(e.to_string()),
            }
        }
        (defaults, refused)
    }

    /// Whether there is any default.
    pub fn is_empty(&self) -> bool {
        *self == SamplingDefaults::default()
    }

    /// `temperature=0.6 top_p=0.9`, for the log.
    pub fn describe(&self) -> String {
        let fields = [
            ("temperature", self.temperature.map(|v| v.to_string())),
            ("top_p", self.top_p.map(|v| v.to_string())),
            ("top_k", self.top_k.map(|v| v.to_string())),
            ("min_p", self.min_p.map(|v| v.to_string())),
            (
                "repetition_penalty",
                self.repetition_penalty.map(|v| v.to_string()),
            ),
        ];
        let set: Vec<String> = fields
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
            .collect();
        set.join(" ")
    }
}

impl SamplingFields {
    /// The request's fields, each one it left out taken from `defaults`.
    pub(super) fn or(mut self, defaults: &SamplingDefaults) -> SamplingFields {
        self.temperature = self.temperature.or(defaults.temperature);
        self.top_p = self.top_p.or(defaults.top_p);
        self.top_k = self.top_k.or(defaults.top_k);
        self.min_p = self.min_p.or(defaults.min_p);
        self.repetition_penalty = self.repetition_penalty.or(defaults.repetition_penalty);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::SamplingDefaults;
    use serde_json::json;

    #[test]
    fn the_sampling_fields_are_read_and_values_no_request_could_send_are_refused() {
        // Llama 3.1 Instruct's file, plus values a request could not send.
        let config = json!({"bos_token_id": 128000, "do_sample": true,
            "eos_token_id": [128001, 128008, 128009], "temperature": 0.6, "top_p": 0.9,
            "top_k": -1, "min_p": 1.5, "repetition_penalty": "high", "max_new_tokens": 64});
        let (d, refused) = SamplingDefaults::from_generation_config(&config);
        assert_eq!(
            d,
            SamplingDefaults {
                temperature: Some(0.6),
                top_p: Some(0.9),
                top_k: Some(-1),
                ..SamplingDefaults::default()
            }
        );
        assert_eq!(d.describe(), "temperature=0.6 top_p=0.9 top_k=-1");
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].contains("min_p"), "{refused:?}");
        assert!(refused[1].contains("repetition_penalty"), "{refused:?}");
        let (none, refused) = SamplingDefaults::from_generation_config(&json!({"eos_token_id": 2}));
        assert!(none.is_empty() && refused.is_empty());
    }
}
