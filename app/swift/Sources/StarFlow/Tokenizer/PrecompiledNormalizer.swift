import Foundation

/// SentencePiece's compiled normaliser (nmt_nfkc for T5), read from `precompiled_charsmap`.
///
/// The blob is a little-endian UInt32 trie size in bytes, that many bytes of a Darts
/// double-array trie over UTF-8 byte strings, then a pool of NUL-terminated replacement
/// strings that the trie's leaf values point into. Normalising walks the text and replaces
/// the longest matching prefix at each position (NFKC folds, control characters, odd spaces),
/// copying one character whenever nothing matches, as SentencePiece's `NormalizePrefix`.
struct PrecompiledNormalizer: Sendable {
    private let units: [UInt32]
    private let pool: [UInt8]

    init(charsmap: Data, source: String) throws {
        let bytes = [UInt8](charsmap)
        guard bytes.count >= 4 else {
            throw StarFlowError.invalidFile(path: source, problem: "precompiled_charsmap is shorter than its 4-byte header")
        }
        let trieBytes = Int(UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24)
        guard trieBytes % 4 == 0, trieBytes >= 4, 4 + trieBytes <= bytes.count else {
            throw StarFlowError.invalidFile(path: source, problem: "precompiled_charsmap declares a \(trieBytes)-byte trie that does not fit the blob")
        }
        units = stride(from: 4, to: 4 + trieBytes, by: 4).map {
            UInt32(bytes[$0]) | UInt32(bytes[$0 + 1]) << 8 | UInt32(bytes[$0 + 2]) << 16 | UInt32(bytes[$0 + 3]) << 24
        }
        pool = Array(bytes[(4 + trieBytes)...])
    }

    func normalize(_ text: String) -> String {
        let input = Array(text.utf8)
        var output: [UInt8] = []
        output.reserveCapacity(input.count)
        var position = 0
        while position < input.count {
            if let match = longestMatch(input, from: position) {
                output.append(contentsOf: replacement(at: match.value))
                position += match.length
            } else {
                let length = input[position].utf8SequenceLength
                let end = min(position + length, input.count)
                output.append(contentsOf: input[position..<end])
                position = end
            }
        }
        return String(decoding: output, as: UTF8.self)
    }

    /// The longest key of the trie that is a prefix of `input[start...]`, with its value.
    private func longestMatch(_ input: [UInt8], from start: Int) -> (length: Int, value: Int)? {
        var node = Self.offset(units[0])
        var best: (length: Int, value: Int)?
        for index in start..<input.count {
            let byte = input[index]
            if byte == 0 { break }
            node ^= Int(byte)
            guard node < units.count, Self.label(units[node]) == UInt32(byte) else { break }
            let unit = units[node]
            node ^= Self.offset(unit)
            if Self.hasLeaf(unit), node < units.count {
                best = (index - start + 1, Self.value(units[node]))
            }
        }
        return best
    }

    private func replacement(at offset: Int) -> ArraySlice<UInt8> {
        guard offset < pool.count else { return [] }
        let end = pool[offset...].firstIndex(of: 0) ?? pool.count
        return pool[offset..<end]
    }

    private static func offset(_ unit: UInt32) -> Int { Int((unit >> 10) << ((unit & (1 << 9)) >> 6)) }
    private static func label(_ unit: UInt32) -> UInt32 { unit & ((1 << 31) | 0xFF) }
    private static func hasLeaf(_ unit: UInt32) -> Bool { (unit >> 8) & 1 == 1 }
    private static func value(_ unit: UInt32) -> Int { Int(unit & ((1 << 31) - 1)) }

}
