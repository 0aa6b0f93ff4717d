//! `adapter_config.json`: what PEFT writes beside a LoRA adapter's weights, parsed and checked
//! against what Caduceus can serve.
//!
//! Missing fields take PEFT's `LoraConfig` defaults (as `PeftConfig.from_pretrained` does), except
//! `peft_type` and `target_modules`, which every saved adapter carries and without which the file is
//! surely not a LoRA adapter config.

use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use super::error::AdapterError;
use super::peft::CONFIG_FILE;
use super::weights::Projection;

/// `adapter_config.json` is a few KB; anything this big is not one.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Layer indices a `target_modules` pattern is tried against when the base model is unknown
/// ([`probe`]); deeper layers are only seen by a full load.
const PROBE_LAYERS: usize = 256;

/// `target_modules` as PEFT allows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetModules {
    /// Module names, each matching a module whose name equals it or ends with `.name`.
    Names(Vec<String>),
    /// A Python-style regular expression that must match a whole module name
    /// (`model.layers.3.self_attn.q_proj`), like PEFT's `re.fullmatch`.
    Pattern(String),
}

/// What [`probe`] learns from `adapter_config.json` alone, without touching the weights.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterInfo {
    /// Where the adapter lives.
    pub dir: PathBuf,
    /// LoRA rank `r`.
    pub rank: usize,
    /// `lora_alpha`.
    pub lora_alpha: f32,
    /// rsLoRA scaling (`alpha / sqrt(r)` instead of `alpha / r`).
    pub use_rslora: bool,
    /// The scale applied to `B·A`.
    pub scale: f32,
    /// `target_modules` as written.
    pub target_modules: TargetModules,
    /// The projections targeted (in some layer).
    pub targets: Vec<Projection>,
    /// The base model the adapter was trained on, as PEFT recorded it.
    pub base_model_name_or_path: Option<String>,
}

/// A parsed, checked config; [`super::peft::load_adapter`] resolves its targets against a base.
#[derive(Debug)]
pub(crate) struct PeftConfig {
    pub rank: usize,
    pub lora_alpha: f32,
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    pattern: Option<Regex>,
    pub base_model_name_or_path: Option<String>,
}

/// The fields Caduceus reads; the many others PEFT writes are ignored.
#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    #[serde(default = "default_r")]
    r: usize,
    #[serde(default = "default_alpha")]
    lora_alpha: f64,
    target_modules: Option<Value>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    bias: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    rank_pattern: Option<Value>,
    alpha_pattern: Option<Value>,
    layers_to_transform: Option<Value>,
    modules_to_save: Option<Value>,
    exclude_modules: Option<Value>,
    trainable_token_indices: Option<Value>,
    target_parameters: Option<Value>,
    layer_replication: Option<Value>,
    base_model_name_or_path: Option<String>,
}

fn default_r() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

/// Reads and checks `dir/adapter_config.json` only: rank, alpha, targets and base model name, for
/// listing and validating adapters without reading their weights.
pub fn probe(dir: &Path) -> Result<AdapterInfo, AdapterError> {
    let bytes = read_config(dir)?;
    let config = PeftConfig::parse(dir, &bytes)?;
    let targets = Projection::ALL
        .into_iter()
        .filter(|&p| (0..PROBE_LAYERS).any(|layer| config.targets(layer, p)))
        .collect();
    let info = AdapterInfo {
        dir: dir.to_path_buf(),
        rank: config.rank,
        lora_alpha: config.lora_alpha,
        use_rslora: config.use_rslora,
        scale: config.scale(),
        target_modules: config.target_modules.clone(),
        targets,
        base_model_name_or_path: config.base_model_name_or_path.clone(),
    };
    Ok(info)
}

/// The bytes of `dir/adapter_config.json`, size-checked before reading.
pub(crate) fn read_config(dir: &Path) -> Result<Vec<u8>, AdapterError> {
    super::peft::read_limited(dir, CONFIG_FILE, MAX_CONFIG_BYTES)
}

/// PEFT's name for the module of `p` in layer `layer` of a Llama-family `*ForCausalLM`.
pub fn module_path(layer: usize, p: Projection) -> String {
    let block = match p {
        Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
        Projection::Gate | Projection::Up | Projection::Down => "mlp",
    };
    format!("model.layers.{layer}.{block}.{}", p.module_name())
}

impl PeftConfig {
    /// Parses and checks everything that does not need the base model.
    pub fn parse(dir: &Path, bytes: &[u8]) -> Result<PeftConfig, AdapterError> {
        let config_err = |message: String| AdapterError::Config {
            dir: dir.to_path_buf(),
            message,
        };
        let unsupported = |feature: String| AdapterError::Unsupported {
            dir: dir.to_path_buf(),
            feature,
        };
        let raw: RawConfig =
            serde_json::from_slice(bytes).map_err(|e| config_err(e.to_string()))?;
        match raw.peft_type.as_deref() {
            Some("LORA") => {}
            Some(other) => return Err(unsupported(format!("peft_type {other:?} (only LORA)"))),
            None => {
                return Err(config_err(
                    "peft_type is missing (expected \"LORA\")".into(),
                ))
            }
        }
        if raw.r == 0 {
            return Err(config_err("r = 0: the LoRA rank must be at least 1".into()));
        }
        if !raw.lora_alpha.is_finite() {
            return Err(config_err(format!(
                "lora_alpha {} is not finite",
                raw.lora_alpha
            )));
        }
        if raw.use_dora {
            return Err(unsupported("DoRA (use_dora: true)".into()));
        }
        if let Some(bias) = raw.bias.as_deref().filter(|b| *b != "none") {
            return Err(unsupported(format!("bias {bias:?} (only \"none\")")));
        }
        if raw.lora_bias {
            return Err(unsupported("lora_bias: true".into()));
        }
        for (field, value) in [
            ("rank_pattern", &raw.rank_pattern),
            ("alpha_pattern", &raw.alpha_pattern),
            ("layers_to_transform", &raw.layers_to_transform),
            ("modules_to_save", &raw.modules_to_save),
            ("exclude_modules", &raw.exclude_modules),
            ("trainable_token_indices", &raw.trainable_token_indices),
            ("target_parameters", &raw.target_parameters),
            ("layer_replication", &raw.layer_replication),
        ] {
            if value.as_ref().is_some_and(is_set) {
                return Err(unsupported(format!(
                    "{field} {} (must be null or empty)",
                    value.as_ref().map_or_else(String::new, Value::to_string)
                )));
            }
        }
        if raw.fan_in_fan_out {
            // PEFT itself resets it to false for nn.Linear targets (all Llama projections), and
            // lora_A/lora_B are stored [r, in] / [out, r] either way, so there is nothing to undo.
            tracing::warn!(dir = %dir.display(), "fan_in_fan_out: true ignored for Linear layers, as PEFT does");
        }
        let target_modules = match raw.target_modules {
            Some(Value::String(s)) => TargetModules::Pattern(s),
            Some(Value::Array(items)) => TargetModules::Names(
                items
                    .into_iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s),
                        other => Err(config_err(format!(
                            "target_modules entries must be strings, got {other}"
                        ))),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            None | Some(Value::Null) => return Err(config_err("target_modules is missing".into())),
            Some(other) => {
                return Err(config_err(format!(
                    "target_modules must be a list of module names or a regex string, got {other}"
                )))
            }
        };
        let pattern = match &target_modules {
            TargetModules::Pattern(p) if p != "all-linear" => Some(
                Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| unsupported(format!("target_modules pattern {p:?} ({e})")))?,
            ),
            _ => None,
        };
        let config = PeftConfig {
            rank: raw.r,
            lora_alpha: raw.lora_alpha as f32,
            use_rslora: raw.use_rslora,
            target_modules,
            pattern,
            base_model_name_or_path: raw.base_model_name_or_path,
        };
        config.check_targets(dir)?;
        Ok(config)
    }

    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        caduceus_kernels::lora::lora_scale(self.lora_alpha, self.rank, self.use_rslora)
    }

    /// Whether the config targets projection `p` of layer `layer`.
    pub fn targets(&self, layer: usize, p: Projection) -> bool {
        match (&self.target_modules, &self.pattern) {
            (TargetModules::Names(names), _) => {
                let path = module_path(layer, p);
                names.iter().any(|n| names_module(&path, n))
            }
            (TargetModules::Pattern(_), Some(re)) => re.is_match(&module_path(layer, p)),
            // "all-linear": PEFT's shorthand for every linear layer but the output head.
            (TargetModules::Pattern(_), None) => true,
        }
    }

    /// Which projections of which layers of a `num_layers` base are targeted; every
    /// `target_modules` entry must name at least one of them.
    pub fn resolve(&self, dir: &Path, num_layers: usize) -> Result<Vec<[bool; 7]>, AdapterError> {
        let wanted: Vec<[bool; 7]> = (0..num_layers)
            .map(|layer| Projection::ALL.map(|p| self.targets(layer, p)))
            .collect();
        let matches_nothing = |module: &str| AdapterError::UnknownTarget {
            dir: dir.to_path_buf(),
            module: module.to_owned(),
            reason: format!("it matches no module of the base model ({num_layers} layers)"),
        };
        match &self.target_modules {
            TargetModules::Names(names) => {
                for name in names {
                    let found = (0..num_layers).any(|layer| {
                        Projection::ALL
                            .into_iter()
                            .any(|p| names_module(&module_path(layer, p), name))
                    });
                    if !found {
                        return Err(matches_nothing(name));
                    }
                }
            }
            TargetModules::Pattern(p) => {
                if !wanted.iter().flatten().any(|&w| w) {
                    return Err(matches_nothing(p));
                }
            }
        }
        Ok(wanted)
    }

    /// Rejects targets outside the seven projections (`lm_head`, `embed_tokens`, ...), which
    /// PEFT would have adapted but Caduceus cannot.
    fn check_targets(&self, dir: &Path) -> Result<(), AdapterError> {
        let unknown = |module: &str, reason: String| AdapterError::UnknownTarget {
            dir: dir.to_path_buf(),
            module: module.to_owned(),
            reason,
        };
        let supported = "Caduceus adapts only q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj of the decoder layers";
        match (&self.target_modules, &self.pattern) {
            (TargetModules::Names(names), _) => {
                if names.is_empty() {
                    return Err(unknown("", "target_modules is empty".into()));
                }
                for name in names {
                    let last = name.rsplit('.').next().unwrap_or(name);
                    if Projection::from_module_name(last).is_none() {
                        return Err(unknown(name, supported.into()));
                    }
                }
            }
            (TargetModules::Pattern(p), Some(re)) => {
                let others = [
                    "lm_head",
                    "model.embed_tokens",
                    "model.norm",
                    "model.layers.0.input_layernorm",
                    "model.layers.0.post_attention_layernorm",
                ];
                if let Some(other) = others.iter().find(|m| re.is_match(m)) {
                    return Err(unknown(p, format!("it matches {other}; {supported}")));
                }
            }
            (TargetModules::Pattern(_), None) => {}
        }
        Ok(())
    }
}

/// PEFT's list matching: the module's name equals `target` or ends with `.target`.
fn names_module(path: &str, target: &str) -> bool {
    path == target
        || path
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

/// A config field that is present and not null, empty or false.
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}
