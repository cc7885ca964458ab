import Foundation

/// The parts of a Hugging Face `tokenizer.json` that a T5 (SentencePiece Unigram) tokenizer
/// uses. Anything this package does not implement is refused by name instead of ignored, so
/// a different tokenizer cannot give silently different ids.
struct TokenizerFile: Decodable {
    struct AddedToken: Decodable {
        let id: Int
        let content: String
        let singleWord: Bool
        let lstrip: Bool
        let rstrip: Bool
        let normalized: Bool

        enum CodingKeys: String, CodingKey {
            case id, content, lstrip, rstrip, normalized
            case singleWord = "single_word"
        }
    }

    /// A normaliser or pre-tokenizer entry: a `type` and the few fields T5 uses.
    struct Component: Decodable {
        let type: String
        let precompiledCharsmap: String?
        let normalizers: [Component]?
        let pretokenizers: [Component]?
        let replacement: String?
        let prependScheme: String?
        let addPrefixSpace: Bool?
        let split: Bool?

        enum CodingKeys: String, CodingKey {
            case type, normalizers, pretokenizers, replacement, split
            case precompiledCharsmap = "precompiled_charsmap"
            case prependScheme = "prepend_scheme"
            case addPrefixSpace = "add_prefix_space"
        }
    }

    struct VocabEntry: Decodable {
        let piece: String
        let score: Double

        init(from decoder: Decoder) throws {
            var pair = try decoder.unkeyedContainer()
            piece = try pair.decode(String.self)
            score = try pair.decode(Double.self)
        }
    }

    struct Model: Decodable {
        let type: String
        let unkId: Int?
        let vocab: [VocabEntry]
        let byteFallback: Bool?

        enum CodingKeys: String, CodingKey {
            case type, vocab
            case unkId = "unk_id"
            case byteFallback = "byte_fallback"
        }
    }

    /// One item of the post-processor template: the text (`Sequence`) or a special token.
    enum TemplateItem: Decodable {
        case sequence
        case special(String)

        private enum Keys: String, CodingKey { case sequence = "Sequence", specialToken = "SpecialToken" }
        private struct Special: Decodable { let id: String }

        init(from decoder: Decoder) throws {
            let container = try decoder.container(keyedBy: Keys.self)
            if let special = try container.decodeIfPresent(Special.self, forKey: .specialToken) {
                self = .special(special.id)
            } else if container.contains(.sequence) {
                self = .sequence
            } else {
                throw DecodingError.dataCorruptedError(forKey: .sequence, in: container, debugDescription: "template item is neither Sequence nor SpecialToken")
            }
        }
    }

    struct PostProcessor: Decodable {
        let type: String
        let single: [TemplateItem]?
    }

    let addedTokens: [AddedToken]
    let normalizer: Component?
    let preTokenizer: Component?
    let postProcessor: PostProcessor?
    let model: Model

    enum CodingKeys: String, CodingKey {
        case model, normalizer
        case addedTokens = "added_tokens"
        case preTokenizer = "pre_tokenizer"
        case postProcessor = "post_processor"
    }
}
