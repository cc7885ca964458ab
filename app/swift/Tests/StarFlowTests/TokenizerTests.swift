import Foundation
import Testing
@testable import StarFlow

/// Token ids and masks must equal the official tokenizer call exactly (fixtures/t5/README.md §5:
/// "input_ids, attention_mask: exact equality"), for every caption set.
struct TokenizerTests {
    static let captionSets = ["short", "cfg", "full", "tokenizer_only"]

    let tokenizer: T5Tokenizer
    let captions: [String: [String]]
    let arrays: SafeTensorsFile

    init() throws {
        tokenizer = try T5Tokenizer(contentsOf: Fixtures.file("t5/tokenizer.json"))
        let json = try Fixtures.json("t5/fixtures.json")
        captions = json["captions"] as? [String: [String]] ?? [:]
        arrays = try Fixtures.safetensors("t5/fixtures.safetensors")
    }

    @Test(arguments: captionSets)
    func idsAndMasksEqualTheOfficialTokenizer(set: String) throws {
        let texts = try #require(captions[set])
        let ids = try arrays.integers("\(set).input_ids")
        let mask = try arrays.integers("\(set).attention_mask")
        let length = ids.shape[1]
        for (row, text) in texts.enumerated() {
            let encoded = try tokenizer.encode(text, length: length)
            let expectedIds = ids.values[(row * length)..<((row + 1) * length)].map(Int32.init)
            let expectedMask = mask.values[(row * length)..<((row + 1) * length)].map(Int32.init)
            #expect(encoded.inputIds == expectedIds, "ids of \(set)[\(row)] \(text.debugDescription)")
            #expect(encoded.attentionMask == expectedMask, "mask of \(set)[\(row)] \(text.debugDescription)")
        }
    }

    @Test func emptyPromptIsEndOfSequenceThenPadding() throws {
        let encoded = try tokenizer.encode("", length: 4)
        #expect(encoded.inputIds == [1, 0, 0, 0])
        #expect(encoded.attentionMask == [1, 0, 0, 0])
    }

    @Test func specialTokenStringsMapToTheirIds() {
        #expect(tokenizer.tokenize("<pad>") == [0])
        #expect(tokenizer.tokenize("<extra_id_0></s>") == [1023, 1])
    }

    @Test func unknownCharacterRunsBecomeOneUnknownToken() {
        let ids = tokenizer.tokenize("🐶🐱")
        #expect(ids.filter { $0 == 2 }.count == 1)
    }

    @Test func lengthWithoutRoomForTextIsRefused() {
        #expect(throws: StarFlowError.self) { try tokenizer.encode("a", length: 1) }
    }

    @Test func missingFileNamesThePath() {
        let error = #expect(throws: StarFlowError.self) {
            try T5Tokenizer(contentsOf: URL(fileURLWithPath: "/nonexistent/tokenizer.json"))
        }
        #expect(error?.description.contains("/nonexistent/tokenizer.json") == true)
    }

    @Test func unsupportedModelTypeIsRefusedByName() {
        let json = #"{"added_tokens": [], "normalizer": null, "pre_tokenizer": null, "post_processor": null, "model": {"type": "BPE", "vocab": []}}"#
        let error = #expect(throws: StarFlowError.self) { try T5Tokenizer(json: Data(json.utf8), source: "bpe.json") }
        #expect(error?.description.contains("BPE") == true)
    }
}
