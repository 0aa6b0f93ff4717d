//! Stop strings matched on detokenized text with hold-back: text that could be the start of a
//! stop string is held until the next token shows whether it is, so a stop string split across
//! tokens is never emitted (vLLM and TGI do the same).
//!
//! Each stop string runs a Knuth-Morris-Pratt automaton over the text as it arrives, so a token
//! costs O(new bytes x number of stops) amortized, never (held text x stop length): a hostile
//! request with long, self-overlapping stop strings cannot slow the steps other streams share.

/// One stop string with its KMP failure table and how much of it the text now ends with.
#[derive(Clone, Debug)]
struct Matcher {
    pattern: Vec<u8>,
    /// `fail[i]`: length of the longest proper prefix of `pattern[..=i]` that is also a suffix.
    fail: Vec<usize>,
    /// Length of the longest prefix of `pattern` the text seen so far ends with.
    state: usize,
}

impl Matcher {
    fn new(pattern: &str) -> Self {
        let pattern = pattern.as_bytes().to_vec();
        let mut fail = vec![0; pattern.len()];
        let mut k = 0;
        for i in 1..pattern.len() {
            while k > 0 && pattern[i] != pattern[k] {
                k = fail[k - 1];
            }
            if pattern[i] == pattern[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Matcher {
            pattern,
            fail,
            state: 0,
        }
    }

    /// Advances over one byte; true when the whole pattern now ends the text.
    fn feed(&mut self, b: u8) -> bool {
        if self.state == self.pattern.len() {
            self.state = self.fail[self.state - 1];
        }
        while self.state > 0 && self.pattern[self.state] != b {
            self.state = self.fail[self.state - 1];
        }
        if self.pattern[self.state] == b {
            self.state += 1;
        }
        self.state == self.pattern.len()
    }
}

/// Per-request stop-string state.
#[derive(Clone, Debug, Default)]
pub struct StopStrings {
    stops: Vec<Matcher>,
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
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Matcher::new(s))
                .collect(),
            held: String::new(),
        }
    }

    /// Feeds newly detokenized text. When several stop strings complete in it, the one that
    /// starts first wins.
    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(text.to_owned());
        }
        let offset = self.held.len();
        self.held.push_str(text);
        let mut first_match: Option<usize> = None;
        for (i, &b) in text.as_bytes().iter().enumerate() {
            let end = offset + i + 1;
            for m in &mut self.stops {
                if m.feed(b) {
                    let start = end - m.pattern.len();
                    first_match = Some(first_match.map_or(start, |f| f.min(start)));
                }
            }
        }
        if let Some(pos) = first_match {
            let before = self.held[..pos].to_owned();
            self.held.clear();
            self.stops.iter_mut().for_each(|m| m.state = 0);
            return StopCheck::Stopped(before);
        }
        // The longest held suffix that may still grow into a stop string. It starts where a
        // stop string starts, so on a character boundary.
        let keep = self.stops.iter().map(|m| m.state).max().unwrap_or(0);
        let release = self.held.len() - keep;
        let out = self.held[..release].to_owned();
        self.held.drain(..release);
        StopCheck::Continue(out)
    }

    /// Releases held text at the end of generation (no stop string can complete any more).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
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
    fn self_overlapping_stops_match_as_str_find_does() {
        // KMP must fall back correctly: "aab" inside "aaab", and overlapping candidates.
        assert_eq!(
            run(&["aab"], &["a", "a", "a", "b", "c"]),
            ("a".to_string(), true)
        );
        assert_eq!(run(&["abab"], &["ab", "a", "bab"]), (String::new(), true));
        assert_eq!(run(&["abcdef", "cd"], &["abcdef"]), (String::new(), true));
        // Against a naive reference on every split of a text into two pieces.
        let text = "xxaxaabaabaaab-END-ENDE";
        let stops = ["aabaaab", "ENDE", "baab", "zz"];
        for cut in 0..=text.len() {
            let want = stops
                .iter()
                .filter_map(|s| text.find(s))
                .min()
                .map_or((text.to_string(), false), |p| (text[..p].to_string(), true));
            let pieces = [&text[..cut], &text[cut..]];
            let got = run(&stops, &pieces);
            // Once a stop completes in the first piece, generation ends there.
            let first = stops.iter().filter_map(|s| pieces[0].find(s)).min();
            match first {
                Some(p) => assert_eq!(got, (text[..p].to_string(), true), "cut {cut}"),
                None => assert_eq!(got, want, "cut {cut}"),
            }
        }
    }

    #[test]
    fn no_stop_strings_pass_text_straight_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".to_string(), false));
    }
}
