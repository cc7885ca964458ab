import Foundation
import Testing
@testable import StarFlow
@testable import StarFlowReference

/// Converted flow folders load strictly: the config schema is checked key by key, and the weights
/// file must hold exactly the tensors the config describes.
struct ReferenceModelLoadingTests {
    static func config(_ changes: [String: Any] = [:]) -> [String: Any] {
        var json: [String: Any] = [
            "kind": "starflow.flow", "version": 1, "in_channels": 4, "latent_size": 8, "patch_size": 1, "channels": 64,
            "layers_per_block": [1, 1], "txt_size": 4, "txt_dim": 8, "head_dim": 64, "quantization": NSNull(),
        ]
        for (key, value) in changes { json[key] = value }
        return json
    }

    static func folder(config: [String: Any], tensors header: String) throws -> URL {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("starflow-flow-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try JSONSerialization.data(withJSONObject: config).write(to: folder.appendingPathComponent("config.json"))
        let json = Array(header.utf8)
        try Data(withUnsafeBytes(of: UInt64(json.count).littleEndian, Array.init) + json + [0, 0, 0, 0])
            .write(to: folder.appendingPathComponent("model.safetensors"))
        return folder
    }

    @Test func convertedFixtureConfigIsRead() throws {
        let config = try ReferenceFlowModel(contentsOf: Fixtures.model("flow")).config
        #expect(config.layersPerBlock == [1, 1, 1, 1, 1, 2])
        #expect((0..<6).map(config.blockIsFlipped) == [true, false, true, false, true, false])
        #expect(config.tokenChannels == 4 && config.txtSize == 16 && config.txtDim == 32)
    }

    @Test func unknownKeyIsRefused() {
        let error = #expect(throws: StarFlowError.self) { try FlowModelConfig(json: Self.config(["adaln": 1]), source: "config.json") }
        #expect(error?.description.contains("adaln") == true)
    }

    @Test func otherKindOrVersionIsRefused() {
        #expect(throws: StarFlowError.self) { try FlowModelConfig(json: Self.config(["kind": "starflow.vae"]), source: "config.json") }
        #expect(throws: StarFlowError.self) { try FlowModelConfig(json: Self.config(["version": 2]), source: "config.json") }
    }

    @Test func missingRequiredKeyIsNamed() {
        var json = Self.config()
        json["txt_dim"] = nil
        let error = #expect(throws: StarFlowError.self) { try FlowModelConfig(json: json, source: "config.json") }
        #expect(error?.description.contains("txt_dim") == true)
    }

    @Test func quantizedFoldersAreRefusedWithTheFix() {
        let error = #expect(throws: StarFlowError.self) {
            try FlowModelConfig(json: Self.config(["quantization": ["bits": 4, "group_size": 64]]), source: "config.json")
        }
        #expect(error?.description.contains("quantize") == true)
    }

    @Test func missingAndUnexpectedTensorsAreListed() throws {
        let folder = try Self.folder(config: Self.config(), tensors: #"{"stray.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#)
        defer { try? FileManager.default.removeItem(at: folder) }
        do {
            _ = try ReferenceFlowModel(contentsOf: folder)
            Issue.record("an empty weights file loaded")
        } catch let StarFlowError.weightsMismatch(path, missing, unexpected) {
            #expect(path.hasSuffix("model.safetensors"))
            #expect(missing.contains("blocks.0.sos") && missing.contains("blocks.1.proj_txt.weight"))
            #expect(!missing.contains("blocks.0.proj_txt.weight"))
            #expect(unexpected == ["stray.weight"])
        }
    }
}
