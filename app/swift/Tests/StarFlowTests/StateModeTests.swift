import Foundation
import Testing
@testable import StarFlow

/// The state-sharing fallback as the manifest describes it, and the choice made at load: shared
/// state when the device accepts it, the cache-IO twins when it refuses and the export has them,
/// else an error that says how to export them.
struct StateModeTests {
    struct Refused: Error {}

    /// The contract example with the deep block split over two packages and cache-IO twins.
    static func manifestWithFallback() throws -> ExportManifest {
        let manifest = ExportManifestTests.withBlock(ExportManifestTests.textManifest(), 2) { block in
            block["packages"] = ["FlowBlock2_0.mlpackage", "FlowBlock2_1.mlpackage"]
            block["hidden"] = ["input": "hidden", "output": "next_hidden"]
            block["layers"] = [[0], [1]]
            block["cache_io"] = [
                "functions": ["step": ["1": "step_1_io", "16": "step_16_io"], "prefill": "prefill_io"],
                "caches": ["key_cache_0": "new_key_cache_0", "value_cache_0": "new_value_cache_0",
                           "key_cache_1": "new_key_cache_1", "value_cache_1": "new_value_cache_1"],
            ] as [String: Any]
        }
        return try ExportManifestTests.load(manifest)
    }

    @Test func sharedStateWhenTheDeviceAcceptsIt() throws {
        let block = try Self.manifestWithFallback().flow.blocks[2]
        #expect(try StateMode.select(for: block) {} == .shared)
    }

    @Test func cacheIOTwinsWhenTheDeviceRefusesSharing() throws {
        let manifest = try Self.manifestWithFallback()
        let block = manifest.flow.blocks[2]
        #expect(try StateMode.select(for: block) { throw Refused() } == .cacheIO)
        #expect(block.cacheIOStepFunctions.map(\.name) == ["step_1_io", "step_16_io"])
        #expect(block.caches(part: 1) == ["key_cache_1": "new_key_cache_1", "value_cache_1": "new_value_cache_1"])
        let step = manifest.cacheIOInterface(of: block, base: manifest.stepInterface(of: block, chunk: 16, part: 0), part: 0)
        #expect(step.inputs.keys.sorted() == ["key_cache_0", "position", "tokens", "value_cache_0"])
        #expect(step.outputs.keys.sorted() == ["new_key_cache_0", "new_value_cache_0", "next_hidden"])
    }

    @Test func refusalWithoutTwinsSaysHowToExportThem() throws {
        let block = try ExportManifestTests.load(ExportManifestTests.textManifest()).flow.blocks[0]
        let error = #expect(throws: StarFlowError.self) { try StateMode.select(for: block) { throw Refused() } }
        #expect(error?.description.contains("--state-fallback") == true)
    }

    @Test func twinsMustCoverEveryFunction() {
        let manifest = ExportManifestTests.withBlock(ExportManifestTests.textManifest(), 1) { block in
            block["cache_io"] = ["functions": ["step": ["1": "step_1_io"]], "caches": ["key_cache_0": "new_key_cache_0"]] as [String: Any]
        }
        #expect(ExportManifestTests.loadError(manifest).contains("cache_io must give a twin of every step"))
    }
}
