//! The server's configuration file (`caduceus serve --config caduceus.toml`).
//!
//! One [`CaduceusConfig`] is built from defaults < the TOML file < `CADUCEUS_<SECTION>__<KEY>`
//! environment variables < command-line flags ([`ConfigOverrides`]). Unknown keys and bad values
//! fail at start with a [`ConfigError`] naming the key, the value, the expected form and the
//! layer it came from. `deploy/config/caduceus.toml` documents every key.

mod error;
mod load;
mod schema;
mod secrets;
mod sections;
mod units;
mod validate;

pub use error::{ConfigError, Origin};
pub use load::{env_var_name, ConfigOverrides, ENV_PREFIX};
pub use secrets::ApiKey;
pub use sections::{
    AdapterDtype, AdaptersSection, AttentionKernelSetting, CaduceusConfig, Device, Dtype,
    GemmSetting, GenerationConfigSetting, KvCacheSize, KvEventsSection, LoggingSection,
    ModelSection, PrefixCacheIsolation, SchedulerSection, ServerSection, StructuredOutputsSection,
    DEFAULT_KV_CACHE_BYTES,
};
pub use units::{ByteSize, HumanDuration};
