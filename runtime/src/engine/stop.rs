//! Stop strings matched on detokenized text with hold-back: text that could be the start of a
//! stop string is held until the next token shows whether it is, so a stop string split across
//! tokens is never emitted (vLLM and TGI do the same).

/// Per-request stop-string state.
#[derive(Clone, Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not yet released.
    held: String,
}

/// What [`StopStrings::push`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// No stop string yet: this text is safe to emit.
    Continue(String),
    /// A stop string matched: this text precedes it and is the last to emit.
    Stopped(String),
}

impl StopStrings {
    /// Matches `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Feeds newly detokenized text.
    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(text.to_owned());
        }
        self.held.push_str(text);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(pos) = first_match {
            let before = self.held[..pos].to_owned();
            self.held.clear();
            return StopCheck::Stopped(before);
        }
        let keep = self.partial_match_len();
        let release = self.held.len() - keep;
        let out = self.held[..release].to_owned();
        self.held.drain(..release);
        StopCheck::Continue(out)
    }

    /// Releases held text at the end of generation (no stop string can complete any more).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    fn partial_match_len(&self) -> usize {
        let held = self.held.as_str();
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut best = 0;
        for len in 1..longest.min(held.len() + 1) {
            let start = held.len() - len;
            if !held.is_char_boundary(start) {
                continue;
            }
            let suffix = &held[start..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > len && s.starts_with(suffix))
            {
                best = len;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds pieces and returns (emitted text, stopped).
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match s.push(p) {
                StopCheck::Continue(t) => out.push_str(&t),
                StopCheck::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&s.flush());
        (out, false)
    }

    #[test]
    fn a_stop_string_split_across_tokens_is_never_emitted() {
        assert_eq!(
            run(
                &["\nUser:"],
                &["Hello", " there", "\n", "Us", "er", ": more"]
            ),
            ("Hello there".to_string(), true)
        );
    }

    #[test]
    fn held_text_is_released_when_it_turns_out_not_to_be_a_stop() {
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("abcE"), StopCheck::Continue("abc".into()));
        assert_eq!(s.push("N"), StopCheck::Continue(String::new()));
        assert_eq!(s.push("x"), StopCheck::Continue("ENx".into()));
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        assert_eq!(
            run(&["world", "lo w"], &["hello world"]),
            ("hel".to_string(), true)
        );
    }

    #[test]
    fn without_a_match_every_byte_comes_out_in_order() {
        let pieces = ["Dr", ". Lin", " here", ". é", "ü", " END", "E"];
        assert_eq!(run(&["ENDING", "zz"], &pieces), (pieces.concat(), false));
    }

    #[test]
    fn multibyte_text_is_split_only_on_char_boundaries() {
        // "é" is two bytes; the stop "éa" must be held whole, then released as valid UTF-8.
        let mut s = StopStrings::new(vec!["éa".into()]);
        assert_eq!(s.push("xé"), StopCheck::Continue("x".into()));
        assert_eq!(s.push("b"), StopCheck::Continue("éb".into()));
        assert_eq!(run(&["éa"], &["xé", "a"]), ("x".to_string(), true));
    }

    #[test]
    fn no_stop_strings_pass_text_straight_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".to_string(), false));
    }
}
