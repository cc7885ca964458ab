/// Cuts added tokens (`<pad>`, `</s>`, `<unk>`, `<extra_id_N>`) out of a text before the
/// Unigram model sees it, as the Hugging Face tokenizer does: scanning left to right, the
/// longest token starting at the earliest position wins, and it maps straight to its id.
struct AddedTokenSplitter: Sendable {
    enum Segment: Equatable {
        case text(String)
        case token(Int)
    }

    private let tokens: [(scalars: [Unicode.Scalar], id: Int)]

    init(tokens: [(content: String, id: Int)]) {
        self.tokens = tokens
            .filter { !$0.content.isEmpty }
            .map { (Array($0.content.unicodeScalars), $0.id) }
            .sorted { $0.scalars.count > $1.scalars.count }
    }

    func split(_ text: String) -> [Segment] {
        guard !tokens.isEmpty else { return text.isEmpty ? [] : [.text(text)] }
        let scalars = Array(text.unicodeScalars)
        var segments: [Segment] = []
        var pendingStart = 0
        var position = 0
        while position < scalars.count {
            guard let match = longestToken(in: scalars, at: position) else {
                position += 1
                continue
            }
            if pendingStart < position {
                segments.append(.text(String(String.UnicodeScalarView(scalars[pendingStart..<position]))))
            }
            segments.append(.token(match.id))
            position += match.length
            pendingStart = position
        }
        if pendingStart < scalars.count {
            segments.append(.text(String(String.UnicodeScalarView(scalars[pendingStart...]))))
        }
        return segments
    }

    private func longestToken(in scalars: [Unicode.Scalar], at position: Int) -> (id: Int, length: Int)? {
        for token in tokens where position + token.scalars.count <= scalars.count {
            if scalars[position..<position + token.scalars.count].elementsEqual(token.scalars) {
                return (token.id, token.scalars.count)
            }
        }
        return nil
    }
}
