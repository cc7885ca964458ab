import Foundation
import Testing
@testable import StarFlow
@testable import starflow_swift

/// The `starflow-swift` front end: the tokenize command on the fixture tokenizer, and one-line
/// errors with the documented exit statuses.
struct CommandLineToolTests {
    final class Capture {
        var output: [String] = []
        var errors: [String] = []
    }

    func run(_ arguments: [String]) async -> (status: Int32, capture: Capture) {
        let capture = Capture()
        let tool = CommandLineTool(output: { capture.output.append($0) }, errorOutput: { capture.errors.append($0) })
        return (await tool.run(arguments), capture)
    }

    @Test func tokenizePrintsTheFixtureIds() async throws {
        let tokenizer = try Fixtures.file("t5/tokenizer.json").path
        let ids = try Fixtures.safetensors("t5/fixtures.safetensors").integers("cfg.input_ids")
        let (status, capture) = await run(["tokenize", "red panda", "--tokenizer", tokenizer, "--length", "16"])
        #expect(status == 0)
        let line = try #require(capture.output.first)
        let json = try #require(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: [Int]])
        #expect(json["input_ids"] == Array(ids.values[16..<32]))
        #expect(json["attention_mask"] == [1, 1, 1, 1, 1] + [Int](repeating: 0, count: 11))
    }

    @Test func generateParsesEveryOption() throws {
        let request = try GenerateCommand.parse([
            "a red panda", "--model", "/models/export", "--seed", "7", "--guidance", "2.5", "--jacobi-coupled",
            "--no-denoise", "--output", "panda.png", "--compute-units", "cpuAndNeuralEngine", "--jacobi-block-size", "8",
            "--reduce-memory",
        ])
        #expect(request.prompt == "a red panda" && request.model.path == "/models/export" && request.output.lastPathComponent == "panda.png")
        #expect(request.computeUnits == .cpuAndNeuralEngine && request.reduceMemory)
        #expect(try GenerateCommand.parse(["x", "--model", "m"]).reduceMemory == false)
        #expect(request.configuration == GenerationConfiguration(
            seed: 7, sampling: SamplingConfiguration(guidance: 2.5, method: .jacobi(blockSize: 8, coupled: true)), denoise: false))
        #expect(try GenerateCommand.parse(["x", "--model", "m"]).configuration == GenerationConfiguration())
        #expect(try GenerateCommand.parse(["x", "--model", "m", "--sequential"]).configuration.method == .sequential)
    }

    @Test func generateTakesNoiseInsteadOfASeed() throws {
        let request = try GenerateCommand.parse(["x", "--model", "m", "--noise", "/tmp/cat.safetensors", "--noise-index", "2"])
        #expect(request.noise?.file.path == "/tmp/cat.safetensors" && request.noise?.index == 2)
        #expect(try GenerateCommand.parse(["x", "--model", "m", "--noise", "n.safetensors"]).noise?.index == 0)
        #expect(try GenerateCommand.parse(["x", "--model", "m"]).noise == nil)
        for arguments in [["--noise", "n.safetensors", "--seed", "3"], ["--noise-index", "1"], ["--noise", "n.safetensors", "--noise-index", "-1"]] {
            #expect(throws: UsageError.self, "\(arguments)") { try GenerateCommand.parse(["x", "--model", "m"] + arguments) }
        }
    }

    @Test func jacobiSettingsBesideSequentialAreAMistake() {
        #expect(throws: UsageError.self) {
            try GenerateCommand.parse(["x", "--model", "m", "--sequential", "--jacobi-max-iter", "4"])
        }
    }

    @Test func usageMistakesExitWithStatusTwo() async {
        for arguments in [[], ["paint"], ["generate", "x"], ["generate", "x", "--model", "m", "--seed", "-1"],
                          ["generate", "x", "--model", "m", "--compute-units", "gpu"], ["tokenize", "x", "--tokenizer"]] {
            let (status, capture) = await run(arguments)
            #expect(status == 2, "\(arguments)")
            #expect(capture.errors.count == 1, "\(arguments)")
        }
    }

    @Test func missingFilesExitWithStatusOneAndNameThePath() async {
        let (status, capture) = await run(["tokenize", "x", "--tokenizer", "/nonexistent/tokenizer.json"])
        #expect(status == 1)
        #expect(capture.errors == ["error: /nonexistent/tokenizer.json not found; point at the tokenizer.json that came with the model"])
    }

    #if !canImport(CoreML)
    @Test func generateSaysCoreMLIsMissing() async {
        let (status, capture) = await run(["generate", "a cat", "--model", "/nonexistent"])
        #expect(status == 1)
        #expect(capture.errors.first?.contains("Core ML is not available") == true)
    }
    #endif
}
