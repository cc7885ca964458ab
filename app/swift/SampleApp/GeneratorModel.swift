import CoreGraphics
import Foundation
import StarFlow

/// Owns the loaded pipeline and runs one generation at a time off the main actor, publishing
/// progress and the result for the view.
@MainActor
final class GeneratorModel: ObservableObject {
    @Published private(set) var status = "Choose a folder written by `starflow export-coreml`."
    @Published private(set) var image: CGImage?
    @Published private(set) var fraction = 0.0
    @Published private(set) var isBusy = false
    @Published private(set) var isLoaded = false

    private var pipeline: StarFlowPipeline?
    private var stop = StopFlag()

    func load(folder: URL) {
        isBusy = true
        status = "Compiling and loading \(folder.lastPathComponent)…"
        Task {
            let scoped = folder.startAccessingSecurityScopedResource()
            defer { if scoped { folder.stopAccessingSecurityScopedResource() } }
            do {
                let pipeline = try await Task.detached(priority: .userInitiated) {
                    try await StarFlowPipeline.load(resourcesAt: folder, computeUnits: .cpuAndGPU)
                }.value
                self.pipeline = pipeline
                isLoaded = true
                status = "Loaded \(pipeline.manifest.model?.name ?? folder.lastPathComponent)."
            } catch {
                status = "\(error)"
            }
            isBusy = false
        }
    }

    func generate(prompt: String, seed: UInt32, guidance: Double) {
        guard let pipeline, !isBusy else { return }
        isBusy = true
        fraction = 0
        status = "Sampling…"
        let stop = StopFlag()
        self.stop = stop
        var configuration = GenerationConfiguration(seed: seed)
        configuration.guidance = Float(guidance)
        Task {
            do {
                let generated = try await Task.detached(priority: .userInitiated) {
                    try pipeline.generate(prompt: prompt, configuration: configuration) { progress in
                        let done = (Double(progress.stage) + Double(progress.tokensDone) / Double(progress.tokensTotal)) / Double(progress.stageCount)
                        Task { @MainActor in self.fraction = done }
                        return !stop.isSet
                    }
                }.value
                image = generated.cgImage
                status = "\"\(prompt)\", seed \(seed), guidance \(guidance)"
            } catch is CancellationError {
                status = "Stopped."
            } catch {
                status = "\(error)"
            }
            isBusy = false
        }
    }

    func cancel() {
        stop.set()
    }
}

/// A thread-safe "stop now" switch the progress closure reads between model passes.
final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false

    var isSet: Bool { lock.withLock { stopped } }

    func set() { lock.withLock { stopped = true } }
}
