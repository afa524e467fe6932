// Concept Eraser tab (AUTOMATIC1111 WebUI / Forge). Loaded by the WebUI as a classic script after its
// own script.js, so gradioApp(), onUiLoaded(), randomId() and requestProgress() are available.
// ComfyUI never loads this folder's top level (its pack JavaScript lives in javascript/comfyui/ and web/).

/* global gradioApp, onUiLoaded, onOptionsChanged, opts, randomId, requestProgress */

// Erase / Restore / Preview: give the job a task id (first input, a hidden textbox) and follow its
// progress with the WebUI's own progress bar, as the txt2img Generate button does.
function conceptEraserSubmit() {
    var args = Array.prototype.slice.call(arguments);
    if (typeof randomId === "function" && typeof requestProgress === "function") {
        var id = randomId();
        var anchor = gradioApp().getElementById("concept_eraser_progress_anchor");
        if (anchor) {
            requestProgress(id, anchor, null, function() {});
        }
        args[0] = id;
    }
    return args;
}

function conceptEraserRefresh() {
    var refresh = gradioApp().getElementById("concept_eraser_refresh");
    if (refresh) {
        refresh.click();
    }
}

// Refresh the status line whenever the tab is opened (the checkpoint may have changed meanwhile).
if (typeof onUiLoaded === "function") onUiLoaded(function() {
    var tabs = gradioApp().querySelectorAll("#tabs > .tab-nav > button, #tabs > div > button");
    tabs.forEach(function(button) {
        if (button.textContent.trim() === "Concept Eraser") {
            button.addEventListener("click", conceptEraserRefresh);
        }
    });
});

// And after a checkpoint switch from the quicksettings list: the WebUI sends its options back once the new
// model is loaded, then calls onOptionsChanged (the status then says the erasures were dropped).
var conceptEraserCheckpoint = null;
if (typeof onOptionsChanged === "function") onOptionsChanged(function() {
    var checkpoint = opts.sd_model_checkpoint;
    if (conceptEraserCheckpoint !== null && checkpoint !== conceptEraserCheckpoint) {
        conceptEraserRefresh();
    }
    conceptEraserCheckpoint = checkpoint;
});
