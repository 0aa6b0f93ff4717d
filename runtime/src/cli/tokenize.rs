//! `caduceus tokenize`: raw text to token ids, as the model's tokenizer sees it.

use super::ModelArg;
use crate::model::loader::LoadedModel;

/// Arguments of `caduceus tokenize`.
#[derive(Debug, clap::Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Text to tokenize (special-token strings such as `<|im_start|>` become special tokens).
    #[arg(long)]
    text: String,
}

pub(super) fn run(args: TokenizeArgs) -> anyhow::Result<()> {
    let loaded = LoadedModel::load(&args.model.model)?;
    let token_ids = loaded.tokenizer.encode(&args.text)?;
    println!("{}", serde_json::json!({ "token_ids": token_ids }));
    Ok(())
}
