import Foundation
@testable import StarFlow
@testable import StarFlowReference

/// The tiny fixture models (converted with `starflow convert`) behind the reference backend.
enum TinyFlow {
    static func text(height: Int = 8, width: Int = 8) throws -> FlowSampler {
        try sampler(Fixtures.model("flow"), height: height, width: width)
    }

    static func label() throws -> FlowSampler {
        try sampler(Fixtures.model("label_flow"), height: 16, width: 16)
    }

    static func sampler(_ folder: URL, height: Int, width: Int) throws -> FlowSampler {
        let model = try ReferenceFlowModel(contentsOf: folder)
        return try FlowSampler(blocks: model.blocks(height: height, width: width), patchSize: model.config.patchSize,
                               useSoftplus: model.config.useSoftplus)
    }
}
