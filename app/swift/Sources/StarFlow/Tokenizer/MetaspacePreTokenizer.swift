/// The T5 pre-tokenizer: split on whitespace, then mark each word's start with "▁".
///
/// Mirrors `Sequence[WhitespaceSplit, Metaspace(replacement: "▁", prepend_scheme: "always",
/// split: true)]`: every word gets a leading "▁" unless it has one, and a "▁" inside a word
/// starts a new piece, so the Unigram model sees "▁word" units.
struct MetaspacePreTokenizer: Sendable {
    let replacement: Unicode.Scalar
    let prependAlways: Bool
    let splitOnReplacement: Bool

    func words(_ text: String) -> [String] {
        var words: [String] = []
        var word = String.UnicodeScalarView()
        for scalar in text.unicodeScalars {
            if scalar.properties.isWhitespace {
                flush(&word, into: &words)
            } else {
                word.append(scalar)
            }
        }
        flush(&word, into: &words)
        return words
    }

    private func flush(_ word: inout String.UnicodeScalarView, into words: inout [String]) {
        guard !word.isEmpty else { return }
        var marked = String.UnicodeScalarView()
        if prependAlways && word.first != replacement { marked.append(replacement) }
        marked.append(contentsOf: word)
        word = String.UnicodeScalarView()
        guard splitOnReplacement else {
            words.append(String(marked))
            return
        }
        var piece = String.UnicodeScalarView()
        for scalar in marked {
            if scalar == replacement && !piece.isEmpty {
                words.append(String(piece))
                piece = String.UnicodeScalarView()
            }
            piece.append(scalar)
        }
        if !piece.isEmpty { words.append(String(piece)) }
    }
}
