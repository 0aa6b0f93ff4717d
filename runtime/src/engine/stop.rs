//! Stop strings matched on detokenized text with hold-back: text that could be the start of a
//! stop string is held until the next token shows whether it is, so a stop string split across
//! tokens is never emitted (vLLM and TGI do the same). With vLLM's `include_stop_str_in_output`
//! the stop string ends the text instead, and nothing is held back.
//!
//! Each stop string runs a Knuth-Morris-Pratt automaton over the text as it arrives, so a token
//! costs O(new bytes x number of stops) amortized, never (held text x stop length): a hostile
//! request with long, self-overlapping stop strings cannot slow the steps other streams share.

/// One stop string with its KMP failure table and how much of it the text now ends with.
#[derive(Clone, Debug)]
struct Matcher {
    pattern: String,
    /// `fail[i]`: length of the longest proper prefix of `pattern[..=i]` that is also a suffix.
    fail: Vec<usize>,
    /// Length of the longest prefix of `pattern` the text seen so far ends with.
    state: usize,
}

impl Matcher {
    fn new(pattern: &str) -> Self {
        let bytes = pattern.as_bytes();
        let mut fail = vec![0; bytes.len()];
        let mut k = 0;
        for i in 1..bytes.len() {
            while k > 0 && bytes[i] != bytes[k] {
                k = fail[k - 1];
            }
            if bytes[i] == bytes[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Matcher {
            pattern: pattern.to_owned(),
            fail,
            state: 0,
        }
    }

    /// Advances over one byte; true when the whole pattern now ends the text.
    fn feed(&mut self, b: u8) -> bool {
        let pattern = self.pattern.as_bytes();
        if self.state == pattern.len() {
            self.state = self.fail[self.state - 1];
        }
        while self.state > 0 && pattern[self.state] != b {
            self.state = self.fail[self.state - 1];
        }
        if pattern[self.state] == b {
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
    /// Bytes received before `held` (released, or dropped after a stop).
    released: usize,
    /// The matched stop string ends the text (`include_stop_str_in_output`).
    keep_stop: bool,
}

/// What [`StopStrings::push`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// No stop string yet: this text is safe to emit.
    Continue(String),
    /// A stop string matched: `text` is the last to emit, what precedes the stop string (or,
    /// when the stop string is kept, what ends with it).
    Stopped {
        /// The text to emit.
        text: String,
        /// The stop string that matched.
        stop: String,
    },
}

impl StopStrings {
    /// Matches `stops` (empty strings are ignored); `keep_stop`: a matched stop string ends
    /// the emitted text (vLLM's `include_stop_str_in_output`), so no text is ever held back.
    pub fn new(stops: Vec<String>, keep_stop: bool) -> Self {
        StopStrings {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Matcher::new(s))
                .collect(),
            held: String::new(),
            released: 0,
            keep_stop,
        }
    }

    /// Feeds newly detokenized text. When several stop strings complete in it, the one that
    /// starts first wins.
    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(text.to_owned());
        }
        // Positions count bytes since the first push, so a kept stop string may begin in text
        // released before this push.
        let offset = self.released + self.held.len();
        self.held.push_str(text);
        // The match that starts first: (start, end, index of its stop string).
        let mut first_match: Option<(usize, usize, usize)> = None;
        for (i, &b) in text.as_bytes().iter().enumerate() {
            let end = offset + i + 1;
            for (k, m) in self.stops.iter_mut().enumerate() {
                if m.feed(b) {
                    let start = end - m.pattern.len();
                    if first_match.is_none_or(|(s, _, _)| start < s) {
                        first_match = Some((start, end, k));
                    }
                }
            }
        }
        if let Some((start, end, k)) = first_match {
            // Without `keep_stop` a stop string was held whole, so it starts inside `held`.
            let cut = if self.keep_stop { end } else { start } - self.released;
            let text = self.held[..cut].to_owned();
            self.released += self.held.len();
            self.held.clear();
            self.stops.iter_mut().for_each(|m| m.state = 0);
            let stop = self.stops[k].pattern.clone();
            return StopCheck::Stopped { text, stop };
        }
        // The longest held suffix that may still grow into a stop string. It starts where a
        // stop string starts, so on a character boundary.
        let keep = if self.keep_stop {
            0
        } else {
            self.stops.iter().map(|m| m.state).max().unwrap_or(0)
        };
        let release = self.held.len() - keep;
        let out = self.held[..release].to_owned();
        self.held.drain(..release);
        self.released += release;
        StopCheck::Continue(out)
    }

    /// Whether a stop ends the emitted text (`include_stop_str_in_output`).
    pub fn keeps_stop(&self) -> bool {
        self.keep_stop
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
        let (out, stop) = run_keeping(stops, pieces, false);
        (out, stop.is_some())
    }

    /// Feeds pieces and returns (emitted text, the stop string that matched).
    fn run_keeping(stops: &[&str], pieces: &[&str], keep: bool) -> (String, Option<String>) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect(), keep);
        let mut out = String::new();
        for p in pieces {
            match s.push(p) {
                StopCheck::Continue(t) => out.push_str(&t),
                StopCheck::Stopped { text, stop } => {
                    out.push_str(&text);
                    return (out, Some(stop));
                }
            }
        }
        out.push_str(&s.flush());
        (out, None)
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
        let mut s = StopStrings::new(vec!["END".into()], false);
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
        let mut s = StopStrings::new(vec!["éa".into()], false);
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
    fn a_kept_stop_string_ends_the_text_and_nothing_is_held_back() {
        // Against `str::find` on every split of a text into three pieces: the text up to the
        // end of the earliest-starting stop string, emitted as soon as each piece arrives.
        let text = "Dr. Lin: rest, fluids.\nUser: and then?";
        let stops = ["\nUser:", "fluids", "ids.\n"];
        for a in 0..=text.len() {
            for b in a..=text.len() {
                if !text.is_char_boundary(a) || !text.is_char_boundary(b) {
                    continue;
                }
                let pieces = [&text[..a], &text[a..b], &text[b..]];
                let mut s = StopStrings::new(stops.map(String::from).to_vec(), true);
                let mut out = String::new();
                let mut hit = None;
                for p in pieces {
                    match s.push(p) {
                        StopCheck::Continue(t) => {
                            assert_eq!(t, p, "held back at {a}/{b}");
                            out.push_str(&t);
                        }
                        StopCheck::Stopped { text, stop } => {
                            out.push_str(&text);
                            hit = Some(stop);
                            break;
                        }
                    }
                }
                // The stop that starts first also completes first in this text.
                let want = stops
                    .iter()
                    .filter_map(|st| text.find(st).map(|p| (p, *st)))
                    .min();
                let (p, st) = want.expect("a stop occurs");
                assert_eq!(hit.as_deref(), Some(st), "{a}/{b}");
                assert_eq!(out, &text[..p + st.len()], "{a}/{b}");
            }
        }
        assert_eq!(
            run_keeping(&["END"], &["a", "bE", "N", "Dz"], true),
            ("abEND".to_string(), Some("END".to_string()))
        );
        assert_eq!(
            run_keeping(&["END"], &["a", "bE", "N", "Dz"], false),
            ("ab".to_string(), Some("END".to_string()))
        );
    }

    #[test]
    fn no_stop_strings_pass_text_straight_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".to_string(), false));
    }
}
