import Foundation

/// The manifest's internal consistency and the files it names. A mistake here would otherwise
/// surface as a Core ML shape error deep inside sampling, so it is caught at load time with the
/// field and the fix named.
extension ExportManifest {
    /// Every package and data file the manifest names, relative to the export folder.
    public var requiredFiles: [String] {
        var files = flow.blocks.flatMap(\.packageChain) + flow.blocks.compactMap { $0.stepTables?.file }
        if let textEncoder { files += textEncoder.packageChain }
        if let tokenizer = condition?.tokenizer { files.append(tokenizer) }
        if let vae { files.append(vae.package) }
        return files
    }

    func checkFiles(in folder: URL) throws {
        for file in requiredFiles where Self.modelURL(named: file, in: folder) == nil {
            throw StarFlowError.fileNotFound(path: folder.appendingPathComponent(file).path,
                                             fix: "the manifest names it but the export folder lacks it (as .mlpackage or .mlmodelc); export the model again")
        }
    }

    /// The file for a name the manifest gives. A model is named without regard to its
    /// extension: `FlowBlock0.mlpackage` is found as `FlowBlock0.mlmodelc` (compiled, as an app
    /// bundles it; preferred) or as `FlowBlock0.mlpackage`. Other files are taken as named.
    public static func modelURL(named name: String, in folder: URL) -> URL? {
        let named = folder.appendingPathComponent(name)
        let candidates = ["mlpackage", "mlmodelc"].contains(named.pathExtension)
            ? [named.deletingPathExtension().appendingPathExtension("mlmodelc"), named.deletingPathExtension().appendingPathExtension("mlpackage")]
            : [named]
        return candidates.first { FileManager.default.fileExists(atPath: $0.path) }
    }

    func validate(source: String) throws {
        func fail(_ problem: String) -> StarFlowError { .invalidFile(path: source, problem: problem) }
        guard kvCache == nil || kvCache == "state" else {
            throw fail("kv_cache is \(kvCache ?? ""); this package runs Core ML state caches (export again with the default kv_cache \"state\")")
        }
        guard (batch ?? 1) == 1 else {
            throw fail("exported for \(batch ?? 1) images per call; this package generates one image per call (export with --batch-size 1)")
        }
        guard latent.patchSize > 0, latent.height % latent.patchSize == 0, latent.width % latent.patchSize == 0 else {
            throw fail("latent \(latent.height)×\(latent.width) is not a multiple of patch_size \(latent.patchSize)")
        }
        try validateCondition(fail)
        try validateBlocks(fail)
        if let vae {
            guard image.height == latent.height * vae.factor, image.width == latent.width * vae.factor else {
                throw fail("image \(image.height)×\(image.width) is not the latent \(latent.height)×\(latent.width) times the VAE factor \(vae.factor)")
            }
        } else {
            guard image.height == latent.height, image.width == latent.width, image.channels == latent.channels else {
                throw fail("a model without a VAE must sample the image itself, but image \(image.channels)×\(image.height)×\(image.width) differs from latent \(latent.channels)×\(latent.height)×\(latent.width)")
            }
        }
    }

    private func validateCondition(_ fail: (String) -> StarFlowError) throws {
        guard let condition else { return }
        switch condition.kind {
        case "text":
            guard condition.tokenizer != nil, let textEncoder else {
                throw fail("a text model needs condition.tokenizer and text_encoder")
            }
            guard textEncoder.packageChain.count == 1 || textEncoder.hidden != nil else {
                throw fail("text_encoder: \(textEncoder.packageChain.count) packages need the name of the hidden state they pass on")
            }
        case "labels":
            guard let labels = condition.labels, !labels.isEmpty else { throw fail("a label model needs condition.labels") }
            guard condition.dim == labels.count + 1, condition.length == 1 else {
                throw fail("condition of \(labels.count) labels must have dim \(labels.count + 1) (labels plus the empty class) and length 1, got dim \(condition.dim), length \(condition.length)")
            }
        default:
            throw fail("condition.kind \(condition.kind) is neither text nor labels")
        }
    }

    private func validateBlocks(_ fail: (String) -> StarFlowError) throws {
        let blocks = flow.blocks
        guard !blocks.isEmpty, blocks.map(\.index) == Array(0..<blocks.count) else {
            throw fail("flow.blocks must list blocks 0…K−1 in forward order, got indices \(blocks.map(\.index))")
        }
        let tokens = (latent.height / latent.patchSize) * (latent.width / latent.patchSize)
        let channels = latent.channels * latent.patchSize * latent.patchSize
        for block in blocks {
            let deep = block.index == blocks.count - 1
            let conditioned = deep && condition != nil
            let name = "flow.blocks[\(block.index)]"
            guard block.hasText == conditioned else {
                throw fail("\(name): has_text is \(block.hasText); only the last (deep) block of a conditioned model reads the condition")
            }
            guard block.packageChain.count == 1 || block.hidden != nil else {
                throw fail("\(name): a block split into \(block.packageChain.count) packages needs the name of the hidden state they pass on")
            }
            guard block.tokens == tokens, block.tokenChannels == channels, block.sos.count == channels else {
                throw fail("\(name): tokens \(block.tokens), token_channels \(block.tokenChannels) and \(block.sos.count) sos values do not fit the latent (\(tokens) tokens of \(channels) channels)")
            }
            let sizes = block.stepFunctions.map(\.size)
            guard let largest = sizes.last, sizes.count == block.functions.step.count, sizes.allSatisfy({ $0 > 0 }) else {
                throw fail("\(name): functions.step must map positive chunk sizes to function names")
            }
            let textLength = conditioned ? condition?.length ?? 0 : 0
            guard block.textLength == textLength else {
                throw fail("\(name): text_length \(block.textLength), expected \(textLength)")
            }
            guard block.cacheLength == textLength + tokens + largest - 1 else {
                throw fail("\(name): cache_length \(block.cacheLength), expected text + tokens + largest chunk − 1 = \(textLength + tokens + largest - 1)")
            }
            guard block.rows == (conditioned ? 2 : 1) else {
                throw fail("\(name): rows \(block.rows), expected \(conditioned ? 2 : 1) (a conditioned deep block runs conditional and unconditional rows)")
            }
            if conditioned {
                guard block.functions.prefill != nil, block.inputs.text != nil else {
                    throw fail("\(name): the deep block needs a prefill function and a text input")
                }
            }
            if let cacheIO = block.cacheIO {
                guard Set(cacheIO.functions.step.keys) == Set(block.functions.step.keys),
                      (cacheIO.functions.prefill != nil) == (block.functions.prefill != nil), !cacheIO.caches.isEmpty else {
                    throw fail("\(name): cache_io must give a twin of every step (and prefill) function and name the caches")
                }
            }
            if scoreStep != nil {
                guard block.functions.forward != nil, block.functions.vjp != nil else {
                    throw fail("\(name): the score step needs forward and vjp functions in every block; export again, or with --no-score-step")
                }
            }
        }
    }
}
