//! Splitting documents into passages for recall (`nocturne recall add`).
//!
//! Principal item: [`split`].
//!
//! A document is cut at blank lines into paragraphs; a paragraph that fits
//! the encoder's window is one passage, a longer one is cut into windows of
//! whole words, each as long as fits `max_tokens` encoder tokens (special
//! tokens included), the next starting three quarters of the way into the
//! previous one, so consecutive windows overlap by a quarter of their words
//! and a sentence cut at one window's end is whole in the next. This is the
//! fixed-size-with-overlap chunking retrieval systems commonly use (for
//! example LangChain's text splitters' `chunk_size`/`chunk_overlap`), sized
//! in the encoder's own tokens so that no passage is truncated when
//! embedded. Whitespace inside a passage is normalised to single spaces.

/// Passages of `text` (module docs), in order. `count` gives the encoder
/// tokens of a text (special tokens included; a count of `max_tokens` or
/// more is taken as too long, since a truncating tokenizer saturates
/// there). A single word longer than the window is a passage of its own
/// (the encoder truncates it).
///
/// # Errors
/// What `count` returns.
pub fn split<E>(text: &str, max_tokens: usize, mut count: impl FnMut(&str) -> Result<usize, E>) -> Result<Vec<String>, E> {
    let mut passages = Vec::new();
    for paragraph in paragraphs(text) {
        let words: Vec<&str> = paragraph.split_whitespace().collect();
        let mut start = 0;
        while start < words.len() {
            // The longest window from `start` that fits, found by bisection on
            // its end (token counts grow with the words taken).
            let (mut fits, mut over) = (start + 1, words.len() + 1);
            while fits + 1 < over {
                let middle = (fits + over) / 2;
                if count(&words[start..middle].join(" "))? < max_tokens {
                    fits = middle;
                } else {
                    over = middle;
                }
            }
            passages.push(words[start..fits].join(" "));
            if fits == words.len() {
                break;
            }
            start += ((fits - start) * 3 / 4).max(1);
        }
    }
    Ok(passages)
}

/// The non-empty paragraphs of `text`: runs of lines between blank lines.
fn paragraphs(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split("\n\n")
        .flat_map(|block| block.split("\r\n\r\n"))
        .map(|block| block.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per word plus two special tokens, saturating at `max` as a
    /// truncating tokenizer does.
    fn words(max: usize) -> impl FnMut(&str) -> Result<usize, ()> {
        move |t: &str| Ok((t.split_whitespace().count() + 2).min(max))
    }

    #[test]
    fn a_short_paragraph_is_one_passage_and_paragraphs_stay_apart() {
        let text = "The pump starts at dawn.\n\n  Filters are\nchanged monthly.  \n\n\n";
        assert_eq!(split(text, 16, words(16)).unwrap(), ["The pump starts at dawn.", "Filters are changed monthly."]);
        assert!(split(" \n\n \n", 16, words(16)).unwrap().is_empty());
    }

    #[test]
    fn a_long_paragraph_is_cut_into_windows_that_fit_and_overlap_by_a_quarter() {
        let text: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
        let passages = split(&text.join(" "), 10, words(10)).unwrap();
        // 7 words + 2 specials = 9 < 10: windows of 7 words, each next one 5 words on.
        let first: Vec<&str> = passages[0].split(' ').collect();
        assert_eq!(first, text[..7].iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(passages[1].split(' ').next(), Some("w5"));
        for p in &passages {
            assert!(p.split(' ').count() + 2 < 10, "{p}");
        }
        // Every word is in some passage, in order, and the last passage ends the text.
        let covered: std::collections::BTreeSet<&str> = passages.iter().flat_map(|p| p.split(' ')).collect();
        assert_eq!(covered.len(), 40);
        assert!(passages.last().unwrap().ends_with("w39"));
    }

    #[test]
    fn a_word_longer_than_the_window_is_a_passage_of_its_own() {
        let passages = split("a b c", 3, |_: &str| Ok::<_, ()>(3)).unwrap();
        assert_eq!(passages, ["a", "b", "c"]);
    }

    #[test]
    fn a_counting_error_is_returned() {
        assert_eq!(split("a b c d", 4, |_: &str| Err::<usize, _>("broken")), Err("broken"));
    }
}
