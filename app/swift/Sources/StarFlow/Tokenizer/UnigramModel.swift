/// SentencePiece's Unigram segmentation: the split of a word into vocabulary pieces with the
/// highest total score (Viterbi over UTF-8 byte positions).
///
/// A character that starts no piece of its own becomes `<unk>` with the lowest score minus 10,
/// and a run of adjacent unknown characters is merged into one `<unk>`, as the Hugging Face
/// tokenizer that STARFlow uses does. Ties keep the earliest candidate, as that tokenizer.
struct UnigramModel: Sendable {
    private static let unknownPenalty = 10.0

    private let pieceIds: [[UInt8]: Int]
    private let scores: [Double]
    private let longestPiece: Int
    private let unknownScore: Double
    let unknownId: Int

    init(pieces: [(piece: String, score: Double)], unknownId: Int) {
        var ids: [[UInt8]: Int] = [:]
        for (id, entry) in pieces.enumerated() {
            ids[Array(entry.piece.utf8)] = id
        }
        pieceIds = ids
        scores = pieces.map(\.score)
        longestPiece = pieces.map(\.piece.utf8.count).max() ?? 0
        unknownScore = (scores.min() ?? 0) - Self.unknownPenalty
        self.unknownId = unknownId
    }

    /// The ids of the best segmentation of one pre-tokenized word.
    func encode(_ word: String) -> [Int] {
        let bytes = Array(word.utf8)
        guard !bytes.isEmpty else { return [] }
        var ids: [Int] = []
        var unknownRun: Range<Int>?
        for segment in bestSegments(bytes) {
            if segment.id == unknownId {
                unknownRun = (unknownRun?.lowerBound ?? segment.range.lowerBound)..<segment.range.upperBound
                continue
            }
            if let run = unknownRun {
                ids.append(pieceIds[Array(bytes[run])] ?? unknownId)
                unknownRun = nil
            }
            ids.append(segment.id)
        }
        if let run = unknownRun {
            ids.append(pieceIds[Array(bytes[run])] ?? unknownId)
        }
        return ids
    }

    private struct PathNode {
        var id = -1
        var start = -1
        var score = 0.0
    }

    /// The best path's pieces, first to last.
    private func bestSegments(_ bytes: [UInt8]) -> [(id: Int, range: Range<Int>)] {
        var best = [PathNode](repeating: PathNode(), count: bytes.count + 1)
        var start = 0
        while start < bytes.count {
            let characterLength = min(bytes[start].utf8SequenceLength, bytes.count - start)
            let scoreSoFar = best[start].score
            var hasSingleCharacterPiece = false
            for length in 1...max(1, min(longestPiece, bytes.count - start)) {
                guard let id = pieceIds[Array(bytes[start..<start + length])] else { continue }
                relax(&best[start + length], id: id, start: start, score: scoreSoFar + scores[id])
                if length == characterLength { hasSingleCharacterPiece = true }
            }
            if !hasSingleCharacterPiece {
                relax(&best[start + characterLength], id: unknownId, start: start, score: scoreSoFar + unknownScore)
            }
            start += characterLength
        }
        var segments: [(id: Int, range: Range<Int>)] = []
        var end = bytes.count
        while end > 0 {
            let node = best[end]
            segments.append((node.id, node.start..<end))
            end = node.start
        }
        return segments.reversed()
    }

    private func relax(_ node: inout PathNode, id: Int, start: Int, score: Double) {
        if node.start < 0 || score > node.score {
            node = PathNode(id: id, start: start, score: score)
        }
    }
}
