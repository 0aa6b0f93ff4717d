//! The two real doctor avatars, served on the quantized default model with f16 and q8 slots (the
//! production set-ups): each greets in its own words on questions it never saw, alone and mixed
//! with the other avatar and base requests in one batch; the base model never does.

use caduceus_runtime::model::loader::LoadedModel;
use caduceus_runtime::model::LoraDtype;

use super::{greedy, ids, json, run, support};

#[test]
fn avatars_keep_their_greetings_on_unseen_questions_in_mixed_batches() {
    let Some(path) = support::default_model() else {
        return;
    };
    let root = support::shared("reference/avatars");
    let expected = json(&root.join("expected.json"));
    let loaded = LoadedModel::load(&path).unwrap();
    let n = 12;
    let mut requests = Vec::new();
    let mut labels = Vec::new();
    for who in ["dr-lin", "dr-okafor"] {
        for case in expected[who]["cases"].as_array().unwrap() {
            requests.push(greedy(&ids(&case["prompt_token_ids"]), n, Some(who)));
            labels.push(who);
        }
    }
    // The base model on the same questions (the prompt does not depend on the adapter).
    let base_cases = expected["base"]["cases"].as_array().unwrap();
    for (case, lin) in base_cases
        .iter()
        .zip(expected["dr-lin"]["cases"].as_array().unwrap())
    {
        assert_eq!(case["question"], lin["question"]);
        requests.push(greedy(&ids(&lin["prompt_token_ids"]), n, None));
        labels.push("base");
    }
    for dtype in [LoraDtype::F16, LoraDtype::Q8] {
        check(&loaded, &expected, &requests, &labels, dtype);
    }
}

fn check(
    loaded: &LoadedModel,
    expected: &serde_json::Value,
    requests: &[caduceus_runtime::generate::GenerateRequest],
    labels: &[&str],
    dtype: LoraDtype,
) {
    let model = &loaded.model;
    let root = support::shared("reference/avatars");
    let mixed = run(model, &root, requests.to_vec(), 2, dtype, 64);
    let greeting = |who: &str| expected[who]["greeting"].as_str().unwrap().to_owned();
    let (lin, okafor) = (greeting("dr-lin"), greeting("dr-okafor"));
    for ((req, out), who) in requests.iter().zip(&mixed).zip(labels) {
        let text = loaded.tokenizer.decode(&out.token_ids, true).unwrap();
        match *who {
            "base" => assert!(
                !text.contains("Dr. Lin") && !text.contains("Dr. Okafor"),
                "the base model greeted as an avatar: {text:?}"
            ),
            who => {
                let want = if who == "dr-lin" { &lin } else { &okafor };
                assert!(
                    text.trim_start().starts_with(want.as_str()),
                    "{who}: {text:?}"
                );
            }
        }
        let solo = run(model, &root, vec![req.clone()], 2, dtype, 64);
        assert_eq!(
            solo[0].token_ids, out.token_ids,
            "{who} ({dtype:?}): alone vs mixed"
        );
    }
}
