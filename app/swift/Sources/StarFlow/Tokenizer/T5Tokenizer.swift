import Foundation

/// Token ids and attention mask of one caption, padded to the text encoder's length.
public struct TokenizedText: Equatable, Sendable {
    public let inputIds: [Int32]
    public let attentionMask: [Int32]
}

/// The T5 tokenizer of STARFlow's text encoder, read from the model's `tokenizer.json`.
///
/// It reproduces the Hugging Face call the official code makes
/// (`tokenizer(text, padding="max_length", truncation=True, max_length=L)`): added tokens are
/// cut out of the raw text, the rest is normalised (SentencePiece's precompiled nmt_nfkc map),
/// split into "▁word" units and segmented by the Unigram model; the text keeps its first L − 1
/// ids, `</s>` is appended, and pad ids (mask 0) fill the rest.
public struct T5Tokenizer: Sendable {
    private let addedTokens: AddedTokenSplitter
    private let normalizedAddedTokens: AddedTokenSplitter
    private let normalizers: [PrecompiledNormalizer]
    private let preTokenizer: MetaspacePreTokenizer
    private let model: UnigramModel
    private let prefixIds: [Int]
    private let suffixIds: [Int]
    public let padId: Int

    public init(contentsOf url: URL) throws {
        guard let data = FileManager.default.contents(atPath: url.path) else {
            throw StarFlowError.fileNotFound(path: url.path, fix: "point at the tokenizer.json that came with the model")
        }
        try self.init(json: data, source: url.path)
    }

    public init(json: Data, source: String) throws {
        let file: TokenizerFile
        do {
            file = try JSONDecoder().decode(TokenizerFile.self, from: json)
        } catch {
            throw StarFlowError.invalidFile(path: source, problem: "is not a tokenizer.json this package reads (\(Self.reason(error)))")
        }
        try self.init(file: file, source: source)
    }

    init(file: TokenizerFile, source: String) throws {
        guard file.model.type == "Unigram", let unknownId = file.model.unkId else {
            throw StarFlowError.invalidFile(path: source, problem: "model is \(file.model.type) without unk_id; only SentencePiece Unigram (T5) tokenizers are supported")
        }
        guard file.model.byteFallback != true else {
            throw StarFlowError.invalidFile(path: source, problem: "byte_fallback is not supported (T5 tokenizers do not use it)")
        }
        if let odd = file.addedTokens.first(where: { $0.lstrip || $0.rstrip || $0.singleWord }) {
            throw StarFlowError.invalidFile(path: source, problem: "added token \(odd.content) uses lstrip/rstrip/single_word, which this tokenizer does not implement")
        }
        let pieces = file.model.vocab.map { (piece: $0.piece, score: $0.score) }
        model = UnigramModel(pieces: pieces, unknownId: unknownId)
        addedTokens = AddedTokenSplitter(tokens: file.addedTokens.filter { !$0.normalized }.map { ($0.content, $0.id) })
        normalizedAddedTokens = AddedTokenSplitter(tokens: file.addedTokens.filter(\.normalized).map { ($0.content, $0.id) })
        normalizers = try Self.normalizers(file.normalizer, source: source)
        preTokenizer = try Self.preTokenizer(file.preTokenizer, source: source)

        func tokenId(_ content: String) throws -> Int {
            if let token = file.addedTokens.first(where: { $0.content == content }) { return token.id }
            if let index = pieces.firstIndex(where: { $0.piece == content }) { return index }
            throw StarFlowError.invalidFile(path: source, problem: "post-processor token \(content) is not in the vocabulary")
        }
        let template = try Self.template(file.postProcessor, source: source)
        prefixIds = try template.prefix.map(tokenId)
        suffixIds = try template.suffix.map(tokenId)
        padId = file.addedTokens.first(where: { $0.content == "<pad>" })?.id ?? 0
    }

    /// The ids of `text` without the post-processor's special tokens, truncation or padding.
    public func tokenize(_ text: String) -> [Int] {
        addedTokens.split(text).flatMap { segment -> [Int] in
            switch segment {
            case let .token(id):
                return [id]
            case let .text(raw):
                let normalized = normalizers.reduce(raw) { $1.normalize($0) }
                return normalizedAddedTokens.split(normalized).flatMap(encodeNormalized)
            }
        }
    }

    /// Ids and mask of exactly `length` entries: truncated text, `</s>`, then padding.
    public func encode(_ text: String, length: Int) throws -> TokenizedText {
        let special = prefixIds.count + suffixIds.count
        guard length > special else {
            throw StarFlowError.invalidArgument("text length \(length) leaves no room for the text; use at least \(special + 1)")
        }
        let ids = prefixIds + tokenize(text).prefix(length - special) + suffixIds
        let padding = length - ids.count
        return TokenizedText(
            inputIds: ids.map(Int32.init) + [Int32](repeating: Int32(padId), count: padding),
            attentionMask: [Int32](repeating: 1, count: ids.count) + [Int32](repeating: 0, count: padding)
        )
    }

    private func encodeNormalized(_ segment: AddedTokenSplitter.Segment) -> [Int] {
        switch segment {
        case let .token(id):
            return [id]
        case let .text(text):
            return preTokenizer.words(text).flatMap(model.encode)
        }
    }

    private static func normalizers(_ component: TokenizerFile.Component?, source: String) throws -> [PrecompiledNormalizer] {
        guard let component else { return [] }
        switch component.type {
        case "Precompiled":
            guard let encoded = component.precompiledCharsmap, let blob = Data(base64Encoded: encoded) else {
                throw StarFlowError.invalidFile(path: source, problem: "the Precompiled normalizer has no valid base64 precompiled_charsmap")
            }
            return [try PrecompiledNormalizer(charsmap: blob, source: source)]
        case "Sequence":
            return try (component.normalizers ?? []).flatMap { try normalizers($0, source: source) }
        default:
            throw StarFlowError.invalidFile(path: source, problem: "normalizer \(component.type) is not supported (T5 uses Precompiled)")
        }
    }

    private static func preTokenizer(_ component: TokenizerFile.Component?, source: String) throws -> MetaspacePreTokenizer {
        let steps = component.map { $0.type == "Sequence" ? ($0.pretokenizers ?? []) : [$0] } ?? []
        guard steps.map(\.type) == ["WhitespaceSplit", "Metaspace"], let metaspace = steps.last else {
            let found = steps.map(\.type).joined(separator: ", ")
            throw StarFlowError.invalidFile(path: source, problem: "pre-tokenizer [\(found)] is not supported (T5 uses WhitespaceSplit then Metaspace)")
        }
        let prependAlways = metaspace.prependScheme.map { $0 == "always" } ?? (metaspace.addPrefixSpace ?? true)
        guard prependAlways, let replacement = metaspace.replacement?.unicodeScalars.first, metaspace.replacement?.unicodeScalars.count == 1 else {
            throw StarFlowError.invalidFile(path: source, problem: "Metaspace must prepend its one-character replacement to every word (prepend_scheme \"always\")")
        }
        return MetaspacePreTokenizer(replacement: replacement, prependAlways: true, splitOnReplacement: metaspace.split ?? true)
    }

    private static func template(_ processor: TokenizerFile.PostProcessor?, source: String) throws -> (prefix: [String], suffix: [String]) {
        guard let processor else { return ([], []) }
        guard processor.type == "TemplateProcessing", let single = processor.single,
              let textIndex = single.firstIndex(where: { if case .sequence = $0 { return true } else { return false } })
        else {
            throw StarFlowError.invalidFile(path: source, problem: "post-processor \(processor.type) is not supported (T5 uses TemplateProcessing \"$A </s>\")")
        }
        func specials(_ items: ArraySlice<TokenizerFile.TemplateItem>) -> [String] {
            items.compactMap { if case let .special(id) = $0 { return id } else { return nil } }
        }
        return (specials(single[..<textIndex]), specials(single[(textIndex + 1)...]))
    }

    private static func reason(_ error: Error) -> String {
        guard let decoding = error as? DecodingError else { return error.localizedDescription }
        switch decoding {
        case let .keyNotFound(key, context):
            return "missing \(key.stringValue) at \(context.codingPath.map(\.stringValue).joined(separator: "."))"
        case let .typeMismatch(_, context), let .valueNotFound(_, context), let .dataCorrupted(context):
            return "\(context.debugDescription) at \(context.codingPath.map(\.stringValue).joined(separator: "."))"
        @unknown default:
            return "\(decoding)"
        }
    }
}
